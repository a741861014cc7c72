"""A long job run in a child process that SIGKILLs itself at a chosen moment, for the kill tests.

``python tests/kill_worker.py JOB ARGS.json``: ARGS names the job's inputs and ``kill``, the
moment: ``{"call": "module:attr", "n": 3, "half": true}`` kills the process on the 3rd call of
that function; with ``half`` the call first writes its file and cuts it in half (a kill in the
middle of writing a shard, a checkpoint, an image or a line). The job's own code is not changed:
only this process's function is wrapped, and the kill is a real SIGKILL."""

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(call: str, n: int, half: bool = False) -> None:
    """Wrap ``module:attr`` so that its ``n``-th call kills this process (after half a write)."""
    module_name, attr = call.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    def wrapped(*args, **kw):
        calls[0] += 1
        if calls[0] < n:
            return real(*args, **kw)
        if not half:
            _die()
        if name == "append":  # jsonl.append(f, record): half a line, cut inside a multibyte character if it has one
            f, record = args
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            leads = [i for i, b in enumerate(data) if b >= 0xC0]
            cut = leads[len(leads) // 2] + 1 if leads else len(data) // 2
            f.flush()
            f.buffer.write(data[:cut])
            f.buffer.flush()
            _die()
        out = real(*args, **kw)
        target = next(Path(a) for a in list(args) + list(kw.values()) if isinstance(a, (str, Path)))
        if target.is_file():
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2])
        _die()
        return out

    setattr(owner, name, wrapped)


def chat_contexts(n: int):
    """The chat teacher's test contexts with French object names (every reply has multibyte characters)."""
    from llava_lite.facts import Obj  # noqa: PLC0415

    from test_chat_teacher import make_contexts  # noqa: PLC0415  (the chat tests' contexts, only for this job)

    contexts = make_contexts(n)
    for c in contexts:
        c.objects = [Obj(o.name.replace("e", "é"), o.box) for o in c.objects]
    return contexts


def main(job: str, args: dict) -> None:
    if args.get("kill"):
        arm(**args["kill"])
    if job == "world":
        from llava_lite import world
        from llava_lite.config import WorldConfig

        world.generate(WorldConfig(**args["cfg"]), args["root"], progress=False)
    elif job == "instruct":
        from llava_lite.paths import Layout
        from llava_lite.teachers import instruct

        instruct.build_split(Layout(Path(args["root"])), args["split"])
    elif job == "chat":
        from llava_lite.config import TeacherConfig
        from llava_lite.teachers import chat

        chat.generate(chat_contexts(args["contexts"]), args["out"], TeacherConfig(**args["teacher"]), progress=False)
    elif job == "features":
        from llava_lite.features import extract
        from llava_lite.vision import VisionTower

        tower = VisionTower.from_config(args["tower"])
        extract(tower, args["instances"], args["images"], args["out"], batch_size=2, shard_size=3, progress=False)
    elif job == "train":
        from kill_jobs import train_job

        train_job(args["stage"], args["out"], resume=args["resume"])
    elif job == "lm":
        from kill_jobs import lm_job

        lm_job(args["out"])
    else:
        raise SystemExit(f"unknown job {job}")


def kill_and_resume(job: str, args: dict, kills: list[dict], tmp_path: Path) -> list[int]:
    """Run ``job`` in a child once per moment of ``kills``, each killed there (SIGKILL), each run
    going on from what the last left; returns the children's exit codes (-9 when killed)."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    codes = []
    for i, kill in enumerate(kills):
        spec = tmp_path / f"kill-{i}.json"
        spec.write_text(json.dumps({**args, "kill": kill}))
        proc = subprocess.run([sys.executable, str(Path(__file__)), job, str(spec)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode in (-9, 0), proc.stderr[-3000:]
        codes.append(proc.returncode)
        spec.unlink()
    return codes


def temp_files(root: Path) -> list[Path]:
    """Every temporary file or folder a writer left under ``root``."""
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


if __name__ == "__main__":
    main(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))
