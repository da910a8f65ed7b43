"""huggingface_hub, network and disk errors as one-line :class:`ConvertError` s, for reads and uploads alike.

The messages never echo the token or the server's text.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx

from .errors import ConvertError


class HubUnreachable(ConvertError):
    """The Hub did not answer (network down, wrong endpoint, time-out): the cache may still serve."""


TOKEN_FIX = "Accept the model's terms on its Hub page if it is gated, then pass --token or set HF_TOKEN"


@contextmanager
def hub_errors(repo_id: str, *, where: str | None = None, endpoint: str | None = None, revision: str | None = None,
               work_dir: Path | None = None, upload: bool = False) -> Iterator[None]:
    """Turn the errors of the Hub calls inside the block into one-line ConvertErrors.

    Args:
        repo_id: the repo being read or written.
        where: what is being accessed, for messages (default: ``repo_id``).
        endpoint: the Hub endpoint, named when it cannot be reached.
        revision: the revision asked for, named when it does not exist.
        work_dir: where downloads go, named when the disk is full.
        upload: the block uploads (``push``); changes what the messages advise.
    """
    where = where or repo_id
    again = "then push again" if upload else "then run the same command again"
    try:
        yield
    except HFValidationError:
        raise ConvertError("invalid repo id", where=repo_id, fix="Use the form owner/name") from None
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise ConvertError("gated repo: access needs an accepted license and a token", where=repo_id,
                           fix=TOKEN_FIX) from None
    except RepositoryNotFoundError:
        raise ConvertError("repo not found, or private and no valid token given", where=repo_id,
                           fix="Check the repo id; for a private repo pass --token or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConvertError(f"revision {revision!r} not found", where=repo_id,
                           fix="Use a branch, tag or commit sha that exists in the repo") from None
    except OfflineModeIsEnabled:
        raise ConvertError("HF_HUB_OFFLINE is set, and this needs the Hub", where=where,
                           fix="Unset HF_HUB_OFFLINE" if upload else
                           "Unset HF_HUB_OFFLINE, or download the model into the Hugging Face cache first") from None
    except (httpx.TransportError, LocalEntryNotFoundError) as exc:  # the latter: HEAD failed, nothing cached
        raise HubUnreachable(f"cannot reach the Hub ({type(exc).__name__})", where=endpoint or where,
                           fix=f"Check the network connection or --endpoint, {again}") from None
    except RemoteEntryNotFoundError:
        raise ConvertError("file not found in the repo", where=where,
                           fix="The repo may have changed; re-run to re-read it") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if upload:
            raise ConvertError(f"upload failed with HTTP {status}", where=repo_id,
                               fix="Check the repo id and that the token has write access (--token or HF_TOKEN)"
                               ) from None
        raise ConvertError(f"Hub request failed with HTTP {status}", where=where,
                           fix="Retry later; check --endpoint and the token's permissions") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConvertError("disk full while downloading", where=str(work_dir or where),
                               fix="Free space or point --work-dir at a larger disk") from None
        raise
