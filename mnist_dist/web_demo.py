"""`mnist-dist serve-demo`: the browser demo (export/web) for a verified export, on a local HTTP server.

The page runs the model itself, with onnxruntime-web; this server only hands out files: the
page's own, onnxruntime-web's from export/web/node_modules, and the export's two models at
fixed URLs (/model/model.onnx, /model/model.int8.onnx). It listens on loopback by default.
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mnist_edge.runtime import FP32_FILE, INT8_FILE

from mnist_dist.errors import MnistDistError
from mnist_dist.store import Location

WEB_DIR = Path(__file__).resolve().parents[1] / "export" / "web"
ORT_URL, ORT_DIR = "/node_modules/onnxruntime-web/dist/", WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
MODEL_URL, MODEL_FILES = "/model/", (FP32_FILE, INT8_FILE)
PAGE_SUFFIXES = (".html", ".js", ".css")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".wasm": "application/wasm", ".map": "application/json", ".onnx": "application/octet-stream"}


EXPORT_FIX = "pass the folder that `mnist-dist export` wrote (RUN/export), or --run RUN"


class DemoError(MnistDistError):
    """The demo cannot be served; the message names the problem and the fix."""


def run_export(run: str) -> Location:
    """RUN/export, where `mnist-dist export --run RUN` publishes a verified export."""
    if not Location.of(run).is_dir():
        raise DemoError(f"{run}: no such run directory. Fix: pass the folder of a finished run, e.g. --run runs/NAME.")
    return Location.of(run) / "export"


def check_export(directory: Location, fix: str) -> None:
    from mnist_dist.export import published, rejected_dir

    if published(directory) is None:
        rejected = rejected_dir(directory)
        why = f" (the last export was rejected: {rejected / 'report.md'})" if rejected.is_dir() else ""
        raise DemoError(f"{directory}: not a verified export{why}. Fix: {fix}.")


def check_web_files() -> None:
    if not (WEB_DIR / "index.html").is_file():
        raise DemoError(f"{WEB_DIR}: the demo page is not there (it ships in the project's source, not in the wheel). "
                        "Fix: run serve-demo from a checkout of mnist-dist.")
    wanted = json.loads((WEB_DIR / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    try:
        installed = json.loads((ORT_DIR.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        installed = None
    if installed != wanted:
        found = "is not installed" if installed is None else f"{installed} is installed, the page pins {wanted}"
        raise DemoError(f"onnxruntime-web {found}. Fix: npm ci --prefix {_shown(WEB_DIR)}")


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve(url_path: str, export: Path) -> Path | None:
    """The file behind a URL path, or None: only the page, onnxruntime-web's files and the models."""
    path = unquote(url_path)
    if path == "/":
        return WEB_DIR / "index.html"
    folder, _, name = path.rpartition("/")
    folder += "/"
    if name in ("", ".", ".."):
        return None
    if folder == "/" and name.endswith(PAGE_SUFFIXES):
        candidate = WEB_DIR / name
    elif folder == ORT_URL:
        candidate = ORT_DIR / name
    elif folder == MODEL_URL and name in MODEL_FILES:
        candidate = export / name
    else:
        return None
    return candidate if candidate.is_file() else None


def make_handler(export: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mnist-dist-demo"

        def do_GET(self) -> None:
            self._send(body=True)

        def do_HEAD(self) -> None:
            self._send(body=False)

        def _send(self, body: bool) -> None:
            path = resolve(urlsplit(self.path).path, export)
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Cache-Control", "no-store")  # a new export replaces the model at the same URL
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                with path.open("rb") as f:
                    try:
                        shutil.copyfileobj(f, self.wfile)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the browser went away mid-file: nothing to tell anyone

        def log_message(self, format, *args) -> None:
            pass  # every page load fetches a dozen files; they are not news

    return Handler


def serve(export_dir: str, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve the demo for the verified export in `export_dir` on a background thread.

    Returns (server, its URL); `server.shutdown()` stops it. Port 0 picks a free one.
    """
    export = Path(export_dir)
    check_export(Location.of(export), EXPORT_FIX)
    check_web_files()
    if not 0 <= port <= 65535:
        raise DemoError(f"--port {port} is not a port. Fix: pass a number from 1 to 65535, or 0 for any free one.")
    try:
        server = ThreadingHTTPServer((host, port), make_handler(export.resolve()))
    except OSError as exc:
        raise DemoError(f"cannot listen on {host}:{port} ({exc.strerror or exc}). "
                        "Fix: pass another --port, or --port 0 for any free one.") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="web-demo", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory: serves its verified export, RUN/export")
    source.add_argument("--export", help="a verified export directory, as written by `mnist-dist export`")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0 picks a free one)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; bad input raises DemoError, one line with the fix. An export in a
    bucket is served from a local copy."""
    if args.run is not None:
        export = run_export(args.run)
        check_export(export, f"mnist-dist export --run {args.run}")
    else:
        export = Location.of(args.export)
        check_export(export, EXPORT_FIX)
    with export.local_copy() as local:
        server, url = serve(str(local), port=args.port)
        print(f"serving the web demo for {export} at {url} (Ctrl-C stops it)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped")
        finally:
            server.shutdown()
            server.server_close()
    return 0
