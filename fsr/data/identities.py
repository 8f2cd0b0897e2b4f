"""Lists of identities: LFW ``pairs.txt`` / ``people.txt`` or one name per line, and the lists
fsr ships (``fsr:celeba-test``: the held-out CelebA identities no fsr model trains or is tuned on).

``fsr prepare --exclude-identities / --only-identities`` read them; ``fsr train`` counts the
training faces that carry a held-out identity's name and records the count in the model card.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: identity lists that ship with fsr, named ``fsr:NAME`` on the command line
SHIPPED_IDENTITY_LISTS = {
    # fsr's held-out CelebA test identities (40 of ../shared/data/celeba_train): never trained or tuned on
    "celeba-test": Path(__file__).parent / "splits" / "celeba_test_identities.txt",
}


class IdentityListError(ValueError):
    """An identity list that does not exist or cannot be read (one line, names the file)."""


def identity_list_path(spec: str | os.PathLike) -> Path:
    """The file an identity-list argument names: a path, or ``fsr:NAME`` for a list fsr ships
    (``fsr:celeba-test``: fsr's held-out CelebA identities). IdentityListError for an unknown name."""
    text = str(spec)
    if text.startswith("fsr:"):
        path = SHIPPED_IDENTITY_LISTS.get(text[4:])
        if path is None:
            raise IdentityListError(f"{text}: no such identity list in fsr (known: "
                                    + ", ".join(f"fsr:{name}" for name in SHIPPED_IDENTITY_LISTS) + ")")
        return path
    return Path(spec)


def read_name_list(path: str | os.PathLike) -> set[str]:
    """Identities named in an LFW ``pairs.txt`` (or ``people.txt``) or a one-name-per-line file."""
    names: set[str] = set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise IdentityListError(f"{path}: cannot read identity list ({exc.strerror or exc})") from None
    for line in lines:
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            continue  # pairs.txt header such as "10 300" (a lone number is a CelebA identity)
        if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
            names.update((parts[0], parts[2]))  # different-person pair
        elif len(parts) in (2, 3) and all(p.isdigit() for p in parts[1:]):
            names.add(parts[0])  # same-person pair / people.txt "name count"
        elif len(parts) == 1:
            names.add(parts[0])
        else:
            names.add(" ".join(parts))
    return names


def read_name_lists(paths: Iterable[str | os.PathLike]) -> set[str]:
    """The union of :func:`read_name_list` over several files (empty for none)."""
    return set().union(*(read_name_list(path) for path in paths))


def held_out_celeba_identities() -> set[str]:
    """The identities of ``fsr:celeba-test`` (CelebA identity numbers as strings)."""
    return read_name_list(SHIPPED_IDENTITY_LISTS["celeba-test"])
