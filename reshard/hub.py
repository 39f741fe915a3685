"""Fetch only the files a conversion needs from the Hugging Face hub.

Weights: safetensors when the repo has them, else pytorch `.bin`; never both. The
revision is pinned to the commit the hub reports first, so every file comes from one
commit, and that commit is recorded in the manifest.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hub_errors

from .errors import SourceError
from .source import SIDE_FILES

WEIGHT_PATTERNS = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
}


def looks_like_repo_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") <= 1 and not source.startswith((".", "/", "~"))


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repo that a conversion needs (top level only)."""
    top = [f for f in repo_files if "/" not in f]
    for kind in ("safetensors", "bin"):
        weights = [f for f in top if any(fnmatch.fnmatch(f, p) for p in WEIGHT_PATTERNS[kind])]
        if weights:
            return [f for f in top if f in SIDE_FILES] + sorted(weights)
    raise SourceError("the repo has no model.safetensors or pytorch_model.bin weights at its top level")


def resolve(repo_id: str, *, revision: str | None = None, token: str | None = None) -> tuple[list[str], dict]:
    """(files to fetch, {"id", "revision", "commit"}) for `repo_id`; `HF_TOKEN` is honoured."""
    info = repo_info(repo_id, revision=revision, token=token)
    files = select_files([s.rfilename for s in info.siblings or []])
    return files, {"id": repo_id, "revision": revision, "commit": info.sha}


def repo_info(repo_id: str, *, revision: str | None = None, token: str | None = None, files_metadata: bool = False):
    """`huggingface_hub.model_info`, its errors turned into `SourceError`s that say what to do."""
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        return huggingface_hub.model_info(repo_id, revision=revision, token=token, files_metadata=files_metadata)
    except hub_errors.GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its terms on the hub, then pass --token or set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise SourceError(f"{repo_id} is neither a local path nor a hub repo you can see "
                          f"(check the name; private repos need --token or HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise SourceError(f"{repo_id} has no revision {revision!r}") from None
    except (OSError, hub_errors.HfHubHTTPError) as e:
        raise SourceError(f"cannot reach the hub for {repo_id} ({str(e).splitlines()[0]}); "
                          f"use a local folder, or check the network") from None


def download(repo_id: str, filename: str, *, commit: str, token: str | None = None, local_dir: Path | None = None) -> Path:
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        return Path(huggingface_hub.hf_hub_download(
            repo_id, filename, revision=commit, token=token, local_dir=local_dir))
    except (OSError, hub_errors.HfHubHTTPError) as e:
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise  # the CLI says: no space left, free some and rerun
        raise SourceError(f"cannot download {filename} from {repo_id} ({str(e).splitlines()[0]}); "
                          f"run the same command again to resume") from None


def fetch(repo_id: str, *, revision: str | None = None, token: str | None = None) -> tuple[Path, dict]:
    """Download what a conversion needs into the hub cache; return (folder, source info)."""
    files, info = resolve(repo_id, revision=revision, token=token)
    paths = [download(repo_id, f, commit=info["commit"], token=token) for f in files]
    return paths[0].parent, info
