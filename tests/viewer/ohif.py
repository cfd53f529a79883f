"""OHIF Viewer, served the way a site serves it: static files and the PACS's DICOMweb on one
origin.

- **The app**: the built ``dist/`` of the npm package ``@ohif/app`` (:data:`OHIF_VERSION`),
  which ``scripts/setup --test`` unpacks into a cache outside the repository
  (:func:`ohif_dist`). Nothing is downloaded here.
- **One origin**: a small threaded HTTP server serves the app and its ``app-config.js`` and
  forwards ``/dicom-web/...`` to Orthanc. Orthanc 1.10 sends no CORS headers, so the browser
  must see both under the same origin; the Host header is passed through because Orthanc's
  DICOMweb plugin builds BulkDataURIs from it, and those must point back at this server.
- **The configuration** (:func:`app_config`): one DICOMweb data source on the same origin.
  ``singlepart: 'bulkdata,video'`` makes OHIF fetch an encapsulated PDF as bulk data instead
  of from ``/rendered``, which Orthanc 1.10 answers with 400.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

OHIF_VERSION = "3.13.2"

# Hop-by-hop headers (RFC 9110 §7.6.1) and what the proxy recomputes itself.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def ohif_dist() -> Path:
    """The unpacked OHIF app (``.../ohif-<version>/dist``).

    Raises
    ------
    FileNotFoundError
        With the command that installs it.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    dist = cache / "cxrnode" / f"ohif-{OHIF_VERSION}" / "dist"
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(
            f"OHIF {OHIF_VERSION} is not unpacked at {dist}; run `scripts/setup --test`, which "
            f"takes @ohif/app@{OHIF_VERSION} from npm and caches it there"
        )
    return dist


def app_config() -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, same origin as the app."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test PACS)",
            "name": "orthanc",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "dicomUploadEnabled": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showLoadingIndicator: true,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  defaultDataSourceName: 'orthanc',
  dataSources: [{json.dumps(source)}],
}};
// DICOMweb on this server's own origin (the test's proxy to Orthanc).
for (const key of ['wadoUriRoot', 'qidoRoot', 'wadoRoot']) {{
  window.config.dataSources[0].configuration[key] = window.location.origin + '/dicom-web';
}}
"""


class ViewerServer:
    """The OHIF app on ``http://127.0.0.1:<port>/``, ``/dicom-web`` forwarded to Orthanc."""

    def __init__(self, dist: Path, orthanc_url: str, config: str | None = None) -> None:
        self.dist = dist.resolve()
        target = urlsplit(orthanc_url)
        self.orthanc = (target.hostname or "127.0.0.1", target.port or 80)
        self.config = (config or app_config()).encode()
        self.requests: list[tuple[str, int]] = []  # (path, status) of every proxied request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ViewerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # the test records proxied requests itself

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path
                if path.startswith("/dicom-web/"):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "text/javascript", viewer.config)
                else:
                    self._static(path)

            def _static(self, path: str) -> None:
                file = (viewer.dist / path.lstrip("/")).resolve()
                if viewer.dist not in file.parents or not file.is_file():
                    file = viewer.dist / "index.html"  # the app's own routes (/viewer?...)
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(200, kind, file.read_bytes())

            def _proxy(self) -> None:
                connection = http.client.HTTPConnection(*viewer.orthanc, timeout=60)
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in _NOT_FORWARDED
                }
                try:
                    connection.request("GET", self.path, headers=headers)
                    answer = connection.getresponse()
                    body = answer.read()
                finally:
                    connection.close()
                viewer.requests.append((self.path, answer.status))
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in _NOT_FORWARDED:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        return Handler
