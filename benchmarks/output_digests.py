"""Byte-identical outputs: SHA-256 of `fsr upscale examples/` and `fsr prepare` on 200 LFW images.

    python benchmarks/output_digests.py --record [--digests FILE] [--work DIR]
    python benchmarks/output_digests.py --check  [--digests FILE] [--work DIR]

Runs the two commands on the CPU (fixed threads, batch size and seed, so the numbers do not
depend on the machine's core count), hashes every output file and either records the digests
(``--record``) or compares them with the recorded ones (``--check``, exit status 1 on any
difference, each differing file named). Files that hold timings (``summary.json``, the
journal, the upscale report) are left out. The fsr that runs is the one ``python -m fsr.cli``
imports; ``--repo DIR`` runs them inside a checkout, first on ``PYTHONPATH``, instead.

The 200 LFW images are the first 200 of ``lfw-deepfunneled`` in sorted path order,
copied under ``WORK/lfw200/<person>/`` so the identity is the folder name.

The last bits of float results depend on the CPU's vector instructions (AVX2 and AVX-512
kernels round differently), so digests compare only on one kind of machine: the record names
the machine it was made on, and ``--check`` says when it runs on another. To check a change,
record with the code before it (``--repo`` an earlier checkout) and check with the code after,
on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fsr.core.device import machine_description

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
DEFAULT_DIGESTS = HERE / "output_digests.json"
LFW = HERE.parent.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"
SAMPLE_SIZE = 200
COMPUTE = ["--device", "cpu", "--precision", "fp32", "--threads", "2", "--batch-size", "64"]
TIMING_FILES = {"summary.json", ".prepare-journal.jsonl", "report.json"}


def lfw_sample(lfw: Path, work: Path, count: int = SAMPLE_SIZE) -> Path:
    """Copy the first `count` LFW images (sorted paths) to WORK/lfw200/<person>/ and return that folder."""
    sample = work / f"lfw{count}"
    files = sorted(lfw.glob("*/*.jpg"))[:count]
    if len(files) < count:
        raise SystemExit(f"{lfw}: found {len(files)} images, need {count}")
    for path in files:
        target = sample / path.parent.name / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return sample


def run_fsr(args: list[str], repo: Path | None) -> None:
    """Run `python -m fsr.cli ARGS`, stopping with its error output if it fails."""
    env = dict(os.environ)
    if repo is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH", "")]))
    # `python -m` puts the working directory first on sys.path: run inside `repo`, so that a
    # checkout's own fsr is imported and not the one of the folder this script was started from
    done = subprocess.run([sys.executable, "-m", "fsr.cli", *args], env=env, capture_output=True, text=True,
                          cwd=repo)
    if done.returncode != 0:
        raise SystemExit(f"fsr {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def tree_digests(root: Path, work: Path) -> dict[str, str]:
    """SHA-256 of every file below `root` except the timing files, keyed by its relative path.

    ``prepare.json`` names the source folder, which lies under `work`: that prefix is replaced
    by ``WORK`` before hashing, so the digests do not depend on where the check runs."""
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name in TIMING_FILES:
            continue
        data = path.read_bytes()
        if path.name == "prepare.json":
            data = data.replace(str(work.resolve()).encode(), b"WORK")
        digests[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return digests


def produce(work: Path, lfw: Path, repo: Path | None) -> dict[str, dict[str, str]]:
    """Run both commands into fresh folders under `work` and hash their outputs."""
    upscale_out, prepare_out = work / "upscale", work / "prepare"
    for folder in (upscale_out, prepare_out):
        shutil.rmtree(folder, ignore_errors=True)
    run_fsr(["upscale", str(EXAMPLES), str(upscale_out), "--no-progress", *COMPUTE], repo)
    sample = lfw_sample(lfw, work.resolve())
    run_fsr(["prepare", str(sample), str(prepare_out), "--split", "test", "--workers", "2", "--no-progress", "--seed", "0", *COMPUTE], repo)
    return {"upscale examples/": tree_digests(upscale_out, work), f"prepare lfw{SAMPLE_SIZE}": tree_digests(prepare_out, work)}


def compare(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    """One line per file that is missing, extra or different between the two digest sets
    (the record's ``machine`` line is not a run)."""
    problems = []
    for run in sorted((set(recorded) | set(current)) - {"machine"}):
        old, new = recorded.get(run, {}), current.get(run, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                problems.append(f"{run}: {name} missing")
            elif name not in old:
                problems.append(f"{run}: {name} not in the record")
            elif old[name] != new[name]:
                problems.append(f"{run}: {name} differs")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", action="store_true", help="write the digests of this fsr's outputs")
    action.add_argument("--check", action="store_true", help="compare this fsr's outputs with the recorded digests")
    parser.add_argument("--digests", type=Path, default=DEFAULT_DIGESTS, help="the digest file (JSON)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fsr-output-digests"), help="scratch folder for outputs")
    parser.add_argument("--lfw", type=Path, default=LFW, help="the lfw-deepfunneled folder")
    parser.add_argument("--repo", type=Path, default=None, help="run the commands inside this checkout, with it first on PYTHONPATH")
    args = parser.parse_args()
    args.work, args.lfw = args.work.resolve(), args.lfw.resolve()  # the commands may run in --repo
    args.work.mkdir(parents=True, exist_ok=True)
    current = produce(args.work, args.lfw, args.repo)
    counts = ", ".join(f"{run}: {len(files)} files" for run, files in current.items())
    machine = machine_description()
    if args.record:
        args.digests.write_text(json.dumps({"machine": machine, **current}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {counts} in {args.digests} ({machine})")
        return
    recorded = json.loads(args.digests.read_text())
    if recorded.get("machine") != machine:
        print(f"note: recorded on {recorded.get('machine', 'an unnamed machine')}; this is {machine}: "
              "float rounding differs between CPU kinds")
    problems = compare(recorded, current)
    for line in problems:
        print(line)
    print(f"{'DIFFERENT' if problems else 'identical'}: {counts}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
