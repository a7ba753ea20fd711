"""Hugging Face Hub: fetch only the files the engine reads, and resolve `--model` (a folder or a repo id).

Everything goes through huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE), its progress bars and its token
(HF_TOKEN or `hf auth login`), so a model downloaded once is found again offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
from pathlib import Path

# What the engine reads: configs, safetensors (+ index), tokenizer files. Meta's original/ only on request.
ENGINE_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
]
META_FILES = ["original/params.json", "original/consolidated.*.pth", "original/tokenizer.model"]


class HubError(RuntimeError):
    """A download that cannot happen, explained in one paragraph (gated repo, no credentials, no network)."""


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")  # organisation/name, as the Hub allows them


def download(repo_id: str, local_dir: str | Path | None = None, original: bool = False,
             revision: str | None = None, local_files_only: bool = False) -> Path:
    """Download (or find in the cache) what the engine needs from `repo_id`; return the folder."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"{repo_id!r} is not a hub repo id: expected organisation/name (letters, digits, "
                         f"'-', '_' and '.'), e.g. meta-llama/Llama-3.2-1B-Instruct")
    if local_dir is not None and Path(local_dir).exists() and not Path(local_dir).is_dir():
        raise ValueError(f"local_dir {local_dir}: exists and is not a folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ENGINE_FILES + (META_FILES if original else [])
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   local_dir=local_dir, local_files_only=local_files_only)
    except GatedRepoError as e:
        raise HubError(
            f"{repo_id} is a gated repository: accept its license on https://huggingface.co/{repo_id} with your "
            f"account, then make a token available (export HF_TOKEN=hf_... or run `hf auth login`) and try again. "
            f"({_first_line(e)})"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{repo_id} was not found on the Hugging Face Hub, or it is private and no valid token was sent. "
            f"Check the spelling (organisation/name), or export HF_TOKEN=hf_... for a private repository."
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{repo_id} has no revision {revision!r}.") from e
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (no network, or "
            f"HF_HUB_OFFLINE=1 is set). Download it on a machine with network access (`llama download {repo_id}`) "
            f"and copy the cache folder (~/.cache/huggingface/hub) here, or pass --model a local folder."
        ) from e
    except HfHubHTTPError as e:
        raise HubError(f"the Hugging Face Hub refused the download of {repo_id}: {_first_line(e)}") from e
    except OSError as e:  # DNS failure, refused connection, full disk
        raise HubError(f"could not download {repo_id}: {_first_line(e)}. Check the network connection "
                       f"and the free space in the cache folder.") from e
    return Path(folder)


def resolve_model(model: str | Path, name: str = "--model") -> Path:
    """A local folder as it is; otherwise a hub repo id, found in the cache first, downloaded if absent. `name` is
    the argument as the messages call it (`--model` on the command line, `source` in `Llama.from_pretrained`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        hint = f"; the folder that holds it is {path.parent}" if path.suffix in (".json", ".safetensors") else ""
        raise ValueError(f"{name} {model}: is a file; give the checkpoint's folder{hint}")
    if isinstance(model, Path) or not REPO_ID.fullmatch(model) or model.startswith((".", "~")):
        raise ValueError(f"{name} {model}: no such folder, and not a hub repo id of the form organisation/name")
    try:
        return download(str(model), local_files_only=True)
    except HubError:
        return download(str(model))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
