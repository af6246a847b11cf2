"""Make docs/page.png: serve a checkpoint, use the page like a person, screenshot the result.

    python3 docs/screenshot.py --checkpoint checkpoints/current            # docs/page.png
    python3 docs/screenshot.py --checkpoint CKPT --films "star wars,fargo" --out /tmp/p.png

It starts uvicorn on a loopback port with the checkpoint, opens the page in Debian's headless
Chromium (Playwright, never a downloaded browser), types each film and adds its first match
(Enter), asks for a side-by-side with and without reasoning, waits for both answers and saves a
full-page PNG reduced to a 256-colour palette (flat colours and text: it stays sharp and small).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    parser.add_argument("--films", default="star wars,toy story,fargo", help="comma-separated searches")
    parser.add_argument("--ratings", default="5,4,5", help="comma-separated, one per film")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--width", type=int, default=1040)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    import uvicorn
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(checkpoint=args.checkpoint))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.1)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.set_default_timeout(600_000)
            expect.set_options(timeout=600_000)  # reasoning on a CPU takes a while
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#server")).to_contain_text("Model ")
            box = page.get_by_label("Find a film by title")
            films = [f.strip() for f in args.films.split(",") if f.strip()]
            ratings = args.ratings.split(",")
            for n, film in enumerate(films):
                box.fill("")
                box.press_sequentially(film, delay=30)
                box.press("Enter")  # the first match for the whole text, as the page promises
                expect(page.locator("#history li")).to_have_count(n + 1)
                if n < len(ratings):
                    page.locator(f"#rating-{n}").select_option(ratings[n].strip())
            box.fill("toy")  # leave a search on screen, as a person would
            expect(page.locator("#matches button").first).to_be_visible()
            page.get_by_label("How many").fill(str(args.k))
            page.get_by_label("Compare with and without reasoning").check()
            page.get_by_role("button", name="Recommend").click()
            runs = page.locator(".run")
            expect(runs).to_have_count(2)
            expect(runs.nth(1).locator(".items li")).to_have_count(args.k)
            expect(page.locator("#run-status")).to_contain_text("Done")
            page.evaluate("document.activeElement.blur()")
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    image = Image.open(args.out).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
