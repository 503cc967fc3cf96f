"""One line for each way a Hugging Face Hub request can fail (used by the Hub commands and by encoder downloads)."""

from __future__ import annotations

import os
import socket
import threading

from .common import short_error
from .errors import HirmError


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def unresolvable(endpoint: str | None = None) -> str | None:
    """Why the Hub's host cannot be reached at all, found in milliseconds: its name does not resolve (no network, no
    DNS). None when it resolves, when that takes over 3 s (the requests' own deadline rules then) or behind a proxy
    (which resolves names itself). huggingface_hub retries a failed connection for about 24 s per request; where the
    name does not even resolve there is nothing to wait for."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(endpoint or constants.ENDPOINT).hostname
    if not host:
        return None
    found: list[str] = []

    def resolve():
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            found.append(f"{host} does not resolve: {e.strerror}")
        except (OSError, UnicodeError):
            pass

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(3.0)
    return found[0] if found else None


def unreachable_error(repo_id: str, why: str, what: str | None = None) -> HirmError:
    held = f" and no cached copy of {what} exists" if what else ""
    return HirmError(f"{repo_id}: the Hugging Face Hub cannot be reached ({why}){held}; connect to the network and try "
                     "again" + (", or use a local copy" if what else ""))


def http_status(e: BaseException | None) -> int | None:
    """The HTTP status behind an error, looking through its causes (huggingface_hub wraps a final 5xx in
    a "not found locally" error after its retries)."""
    seen = 0
    while e is not None and seen < 10:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def hub_error(e: BaseException, repo_id: str, what: str) -> HirmError:
    """One line for each kind of failure: not found (repo / revision / file), access, server error, timeout, offline."""
    from huggingface_hub import errors as he

    if isinstance(e, HirmError):
        return e
    if isinstance(e, he.GatedRepoError):
        return HirmError(f"{repo_id}: gated repository; accept its terms on the Hub and log in ('hf auth login')")
    if isinstance(e, he.RepositoryNotFoundError):  # also what the Hub answers for a private repo without a token
        return HirmError(f"{repo_id}: repository not found on the Hugging Face Hub (or private: log in with 'hf auth login' or pass a token)")
    if isinstance(e, he.RevisionNotFoundError):
        return HirmError(f"{repo_id}: revision {what!r} does not exist; pass a branch, tag or commit sha of the repo")
    status = http_status(e)
    if isinstance(e, he.EntryNotFoundError) and not isinstance(e, he.LocalEntryNotFoundError) and status in (None, 404):
        return HirmError(f"{repo_id}: no file {what!r} in the repo; list them with 'hirm ls {repo_id}'")
    if status in (401, 403):
        return HirmError(f"{repo_id}: access denied ({status}); it is private: log in with 'hf auth login' or pass a token")
    if status == 429:
        return HirmError(f"{repo_id}: the Hugging Face Hub is rate-limiting requests (429); wait a minute and try again")
    if status is not None and status >= 500:
        return HirmError(f"{repo_id}: the Hugging Face Hub answered with a server error ({status}); try again later")
    if status is not None:
        return HirmError(f"{repo_id}: the Hugging Face Hub refused the request ({status}: {short_error(e)})")
    if isinstance(e, he.OfflineModeIsEnabled if hasattr(he, "OfflineModeIsEnabled") else ()) or offline():
        return HirmError(f"{repo_id}: offline (HF_HUB_OFFLINE is set) and no cached copy of {what} exists; "
                         "connect once to download it, or use a local file")
    if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower():
        return HirmError(f"{repo_id}: the Hugging Face Hub did not answer in time; nothing was saved: try again later")
    return HirmError(f"{repo_id}: the Hugging Face Hub cannot be reached and no cached copy of {what} exists "
                     f"({type(e).__name__}); connect once, or pull a local file")
