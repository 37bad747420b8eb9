"""``/reports/latest``: the newest HTML report of the ``build-report`` flow, for read keys.

The report is the file the flow (or ``omni report --html`` into the same folder) wrote last in
``report_dir`` (``OMNI_REPORT_DIR``, default ``omni-reports`` in the working directory):
self-contained, so one response shows it all. 404, with where it looked, until a report exists.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from omni.server.deps import app_settings, require_key
from reports.html import latest_report, report_dir

router = APIRouter(tags=["reports"])


@router.get("/reports/latest", dependencies=[Depends(require_key("read"))], include_in_schema=True)
def latest(request: Request) -> FileResponse:
    """The newest HTML report (read key: the Basic-auth user name)."""
    directory = report_dir(app_settings(request))
    path = latest_report(directory)
    if path is None:
        raise HTTPException(
            status_code=404,
            detail=f"no report yet in {directory}: run the build-report flow or omni report --html",
        )
    return FileResponse(
        path,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            # The report loads nothing: a browser is told so, and would refuse if it tried.
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            "X-Report-File": path.name,
        },
    )
