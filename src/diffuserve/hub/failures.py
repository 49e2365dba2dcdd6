"""A pull's failures, each said in one line for the operator: PullError, and what each hub error means."""

from __future__ import annotations

import errno
import os

from diffuserve.hub.cache import cache_dir, hub_endpoint


class PullError(Exception):
    """A pull that failed, said in one line meant for the operator (newlines in causes are folded)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def explain(exc: BaseException, repo: str, revision: str | None, *, token_sent: bool) -> PullError:
    import httpx2
    from huggingface_hub import errors

    endpoint = hub_endpoint()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return PullError(
            f"disk full while pulling {repo} into {cache_dir()}; free some space or point HF_HOME at a bigger "
            "disk, then run the pull again (finished files and parts are kept)"
        )
    if isinstance(exc, errors.GatedRepoError):
        if token_sent:
            return PullError(
                f"{repo} is gated and the token given (HF_TOKEN or --token) has no access to it: request access "
                f"at {endpoint}/{repo}, or use a token of an account that has it"
            )
        return PullError(
            f"{repo} is gated: request access at {endpoint}/{repo}, then set HF_TOKEN (or pass --token) to a "
            "token of that account"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return PullError(f"{repo} has no revision {revision!r} on the hub; check the branch, tag or commit")
    if isinstance(exc, errors.RepositoryNotFoundError):
        hint = "or that your token can read it" if token_sent else "a private repo also needs HF_TOKEN"
        return PullError(f"{repo} not found on the hub; check the id ({hint})")
    if isinstance(exc, errors.HFValidationError):
        return PullError(f"{repo!r} is neither a hub repo id (org/name) nor an existing local folder")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return PullError(f"HF_HUB_OFFLINE is set: {repo} cannot be downloaded; unset it to download")
    transport = _cause_of_type(exc, httpx2.TransportError)
    if transport is not None or isinstance(exc, errors.LocalEntryNotFoundError):
        reason = _first_line(transport or exc)
        return PullError(
            f"cannot reach the hub at {endpoint} (HF_ENDPOINT{_proxy_note()}): {reason}; for a model already in "
            "the cache, set HF_HUB_OFFLINE=1"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            return PullError(f"the hub refused the token (HF_TOKEN or --token) for {repo}: 401 Unauthorized")
        server = exc.server_message or _first_line(exc)
        return PullError(f"the hub answered {status} for {repo}: {server}")
    if isinstance(exc, OSError) and exc.filename is not None:
        return PullError(f"cannot write the hub cache ({exc.strerror or exc}: {exc.filename}); check HF_HOME")
    return PullError(f"pulling {repo} failed: {type(exc).__name__}: {_first_line(exc)}")


def _cause_of_type(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _proxy_note() -> str:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            return f", proxy {os.environ[name]} from {name.upper()}"
    return ""
