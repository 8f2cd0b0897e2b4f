"""Weight conversions and fits, run by hand from the repository root (``python -m tools.NAME``).

Not part of the installed package: nothing in ``fsr`` imports these. They need the
``convert`` extra (``pip install -e ".[convert]"``).

- ``convert_mtcnn``: PyPI ``mtcnn==1.0.0`` -> ``weights/mtcnn.safetensors``.
- ``convert_dlib`` (+ ``dlib_format``, a numpy reader of dlib's serialisation): dlib's face
  recognition ResNet v1 -> ``weights/dlib_resnet_v1.safetensors``.
- ``fit_dlib_template``: the MTCNN 5-point template that reproduces dlib's face chips.
"""
