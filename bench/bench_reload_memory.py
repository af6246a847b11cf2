"""A replica's resident memory across hot reloads (service/state.py `reload`, `_release`).

    python3 bench/bench_reload_memory.py --checkpoint checkpoints/current [--reloads 3]

Copies the checkpoint into a versions root as `--reloads` + 1 versions, then, in a fresh
process per mode, serves the first through the app in process (the engine backend, the
in-process store), answers one reasoning request, and reloads to each next version in turn
with a request after each; after each reload it waits for the replaced model's release and
prints the process's VmRSS. Two modes, one after the other in the same run:

- `as shipped`: what the service does;
- `replaced models held`: the same, but every replaced model kept referenced and nothing
  trimmed: what a model a reload does not free costs. (Before stop 38 the lifespan held the
  first model for good and glibc kept what the others freed; the k8s journey measured that
  code at 2.00 -> 3.46 -> 4.89 -> 5.48 GB over three reloads.)

Prints, per mode, RSS after startup and after each reload, and the growth per reload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "bench"  # the admin key of the app in process
MODES = {"as shipped": False, "replaced models held": True}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(root: Path, versions: list[str], hold: bool) -> list[float]:
    import httpx

    import service.state
    from service.app import create_app
    from service.config import Settings

    held = []
    if hold:  # the old behaviour: every replaced model stays referenced, and nothing is trimmed
        real = service.state.ServiceState._release

        async def keep(self, old):
            held.append(old())

        service.state.ServiceState._release = keep
        del real
    settings = Settings(checkpoint=root, redis_url="", watch_interval_s=0, warmup_requests=0, api_key=KEY)
    app = create_app(settings)
    body = {"history": [{"item_id": "50", "rating": 5}, {"item_id": "172", "rating": 5}], "k": 3}
    out = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ec", timeout=600) as client:
            (await client.post("/recommend", json=body)).raise_for_status()
            out.append(rss_mb())
            for version in versions[1:]:
                reload = {"checkpoint": str(root / version)}
                r = await client.post("/admin/reload", json=reload, headers={"X-API-Key": KEY})
                r.raise_for_status()
                (await client.post("/recommend", json={**body, "k": 4})).raise_for_status()
                while app.state.r2ec._releases:  # the replaced model's release has run
                    await asyncio.sleep(0.2)
                out.append(rss_mb())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/current")
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one mode, in a process of its own
        spec = json.loads(args.child)
        print(json.dumps(asyncio.run(run(Path(spec["root"]), spec["versions"], spec["hold"]))))
        return

    from model.checkpoint import META_FILE, resolve_checkpoint

    source = resolve_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="r2ec-reload-") as tmp:
        root = Path(tmp)
        versions = [f"v{i}" for i in range(args.reloads + 1)]
        for version in versions:
            shutil.copytree(source, root / version, ignore=shutil.ignore_patterns("index"))
            meta = json.loads((root / version / META_FILE).read_text())
            (root / version / META_FILE).write_text(json.dumps({**meta, "version": version}))
        (root / "CURRENT").write_text(versions[0] + "\n")
        print(f"{source} as {len(versions)} versions; RSS in MB after startup, then after each reload")
        for mode, hold in MODES.items():
            spec = json.dumps({"root": str(root), "versions": versions, "hold": hold})
            env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, as the parent's
            done = subprocess.run(
                [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env
            )
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            rss = json.loads(done.stdout.strip().splitlines()[-1])
            growth = (rss[-1] - rss[0]) / max(1, len(rss) - 1)
            shown = " -> ".join(f"{r:.0f}" for r in rss)
            print(f"{mode:>20}: {shown}  ({growth:+.0f} MB a reload)")


if __name__ == "__main__":
    main()
