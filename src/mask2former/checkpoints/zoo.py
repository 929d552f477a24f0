"""Released weights by name: a preset's official model-zoo checkpoint or a Hugging Face hub id -> local path.

`resolve_weights("coco-panoptic-r50")` downloads the official detectron2 checkpoint listed for that preset
in facebookresearch/Mask2Former's MODEL_ZOO.md, verifies it, converts it once to our format and returns
the converted folder; later calls return the cache. Paths that exist are returned unchanged.

Cache layout under $MASK2FORMER_HOME (default ~/.cache/mask2former):
  downloads/<preset>/model_final_<hash>.pkl   the official file, renamed from .part only when complete
  models/<preset>/                            our format (model.safetensors + config.json), what loads
  hub/                                        huggingface_hub's own cache; models/hub--<owner>--<name>/

Verification: the byte count equals the server's Content-Length, a SHA-256 is checked when one is recorded
here or given as `NAME@sha256:HEX`, the file unpickles with the restricted unpickler and its weights load
strictly into the preset's architecture. The 6 hex digits in an official file name are documented as an
md5 prefix: a mismatch is reported, never a reason to reject a file that passed the rest.
Environment: MASK2FORMER_ZOO_URL replaces the official base URL (mirrors, air-gapped sites, tests);
MASK2FORMER_OFFLINE=1 never touches the network; HF_ENDPOINT is honoured for hub ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mask2former.checkpoints.io import CheckpointError, is_our_format
from mask2former.fileio import temporary_path

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/maskformer/mask2former"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DIGEST = re.compile(r"^(?P<name>.+)@sha256:(?P<hex>[0-9a-fA-F]{64})$")
CHUNK = 1 << 20
# Presets whose weights ship inside the package.
BUNDLED = {"synth-tiny": Path(__file__).resolve().parent.parent / "assets" / "synth-tiny"}


class ZooError(CheckpointError):
    """A released model that cannot be fetched or verified (one line: what to download, where to put it)."""


@dataclass(frozen=True)
class Release:
    """One official checkpoint: its path under the model-zoo base URL and, when known, its SHA-256."""

    path: str
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def md5_prefix(self) -> str | None:
        found = re.search(r"_([0-9a-f]{6})\.pkl$", self.file_name)
        return found.group(1) if found else None


# From MODEL_ZOO.md of facebookresearch/Mask2Former (the presets' architectures; Swin-B/L: the IN21k models).
RELEASES: dict[str, Release] = {
    "coco-panoptic-r50": Release("coco/panoptic/maskformer2_R50_bs16_50ep/model_final_94dc52.pkl"),
    "coco-panoptic-r101": Release("coco/panoptic/maskformer2_R101_bs16_50ep/model_final_b807bd.pkl"),
    "coco-panoptic-swin-t": Release("coco/panoptic/maskformer2_swin_tiny_bs16_50ep/model_final_9fd0ae.pkl"),
    "coco-panoptic-swin-s": Release("coco/panoptic/maskformer2_swin_small_bs16_50ep/model_final_a407fd.pkl"),
    "coco-panoptic-swin-b": Release(
        "coco/panoptic/maskformer2_swin_base_IN21k_384_bs16_50ep/model_final_54b88a.pkl"
    ),
    "coco-panoptic-swin-l": Release(
        "coco/panoptic/maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_f07440.pkl"
    ),
    "coco-instance-r50": Release("coco/instance/maskformer2_R50_bs16_50ep/model_final_3c8ec9.pkl"),
    "coco-instance-r101": Release("coco/instance/maskformer2_R101_bs16_50ep/model_final_eba159.pkl"),
    "coco-instance-swin-t": Release("coco/instance/maskformer2_swin_tiny_bs16_50ep/model_final_86143f.pkl"),
    "coco-instance-swin-l": Release(
        "coco/instance/maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_e5f453.pkl"
    ),
    "ade20k-semantic-r50": Release("ade20k/semantic/maskformer2_R50_bs16_160k/model_final_500878.pkl"),
    "ade20k-semantic-r101": Release("ade20k/semantic/maskformer2_R101_bs16_90k/model_final_0d68be.pkl"),
    "ade20k-semantic-swin-t": Release(
        "ade20k/semantic/maskformer2_swin_tiny_bs16_160k/model_final_5274a6.pkl"
    ),
    "ade20k-semantic-swin-l": Release(
        "ade20k/semantic/maskformer2_swin_large_IN21k_384_bs16_160k_res640/model_final_6b4a3a.pkl"
    ),
}


def home() -> Path:
    """The cache root: $MASK2FORMER_HOME, default ~/.cache/mask2former."""
    return Path(os.environ.get("MASK2FORMER_HOME") or Path.home() / ".cache" / "mask2former").expanduser()


def offline() -> bool:
    return os.environ.get("MASK2FORMER_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def release_url(preset: str) -> str:
    base = os.environ.get("MASK2FORMER_ZOO_URL") or OFFICIAL_BASE_URL
    return f"{base.rstrip('/')}/{RELEASES[preset].path}"


def is_released_name(name: str) -> bool:
    match = DIGEST.match(name)
    return (match.group("name") if match else name) in RELEASES


def resolve_weights(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """A local checkpoint path for a path, a released preset name (`NAME[@sha256:HEX]`) or a hub id.

    Existing paths are returned as they are; names are downloaded, verified and converted once (ZooError,
    one line, when that fails or the network is off). Anything else is returned for the caller to report.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.exists():
        return path
    match = DIGEST.match(text)
    name, digest = (match.group("name"), match.group("hex").lower()) if match else (text, None)
    if name in RELEASES:
        return fetch_release(name, sha256=digest, progress=progress)
    if name in BUNDLED:
        return BUNDLED[name]
    if HUB_ID.match(name) and not name.startswith((".", "/")):
        return fetch_hub(name)
    return path


def fetch_release(preset: str, sha256: str | None = None, progress: bool = True) -> Path:
    """The converted folder of a preset's official checkpoint, downloading and converting it when absent."""
    release = RELEASES[preset]
    converted = home() / "models" / preset
    expected = sha256 or release.sha256
    if is_our_format(converted):
        _check_cached_digest(converted, expected)
        return converted
    raw = home() / "downloads" / preset / release.file_name
    if not raw.is_file():
        url = release_url(preset)
        if offline():
            raise ZooError(_fetch_by_hand(preset, url, raw, "MASK2FORMER_OFFLINE is set"))
        download(url, raw, progress=progress, what=preset)
    digest = file_sha256(raw)
    if expected is not None and digest != expected:
        _discard(raw)
        raise ZooError(f"{raw}: SHA-256 {digest} is not the expected {expected}; the file was deleted")
    _check_md5_prefix(raw, release)
    _convert_verified(raw, preset, converted, digest)
    return converted


def _check_cached_digest(converted: Path, expected: str | None) -> None:
    """A converted cache answers for a SHA-256 only through the digest of the file it was made from."""
    if expected is None:
        return
    from mask2former.checkpoints.io import read_config

    _, document = read_config(converted)
    if document.get("source_sha256") != expected:
        raise ZooError(
            f"{converted}: made from a file with SHA-256 {document.get('source_sha256')}, not {expected}; "
            "delete the folder to download again"
        )


def _fetch_by_hand(preset: str, url: str, raw: Path, why: str) -> str:
    return f"{preset}: {why}; download {url} and put it at {raw}"


def download(url: str, dest: Path, progress: bool = True, what: str = "") -> Path:
    """Stream `url` into dest.part and rename it to `dest` only once every byte announced has arrived."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # per process: torchrun ranks fetch at once
    label = what or dest.name
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - http(s) URLs of the model zoo
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise ZooError(_fetch_by_hand(label, url, dest, f"cannot download ({reason})")) from None
    received = 0
    try:
        with response, open(part, "wb") as handle:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"downloading {label}",
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                while chunk := response.read(CHUNK):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:  # a dropped connection: keep nothing
        part.unlink(missing_ok=True)
        raise ZooError(
            f"{url}: download interrupted after {received} bytes ({error}); run it again"
        ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if total is not None and received != total:
        part.unlink(missing_ok=True)
        raise ZooError(f"{url}: download incomplete ({received} of {total} bytes); run it again")
    os.replace(part, dest)
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5_prefix(raw: Path, release: Release) -> None:
    if release.md5_prefix is None:
        return
    digest = hashlib.md5(usedforsecurity=False)
    with open(raw, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    if not digest.hexdigest().startswith(release.md5_prefix):
        print(
            f"note: {raw.name}: md5 {digest.hexdigest()[:6]} differs from the {release.md5_prefix} in its "
            "name; kept, as it parses and loads strictly",
            file=sys.stderr,
        )


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


def _convert_verified(raw: Path, preset: str, converted: Path, digest: str) -> None:
    """Parse `raw`, load it strictly into the preset's architecture, write our format atomically."""
    from mask2former.checkpoints.convert import convert_to_ours
    from mask2former.checkpoints.io import load_state_dict_strict
    from mask2former.config import get_preset
    from mask2former.modeling.build import build_model

    config = get_preset(preset)
    try:
        state = convert_to_ours(raw, "detectron2", preset=preset).state_dict
        model = build_model(config)
        load_state_dict_strict(model, state, str(raw))
    except CheckpointError as error:
        _discard(raw)  # a corrupt download must not be taken for a good one next time
        raise ZooError(f"{error} (the download was deleted; run it again)") from None
    extra = {"source": release_url(preset), "source_sha256": digest}
    _write_folder_atomically(model.state_dict(), config, converted, extra=extra)


def _write_folder_atomically(state, config, folder: Path, extra: dict) -> None:
    from mask2former.checkpoints.io import save_checkpoint

    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(folder)
    os.mkdir(temp, 0o777)  # the umask decides its mode, as for any new folder
    try:
        save_checkpoint(state, config, temp, extra=extra)
        if folder.exists() and not is_our_format(folder):
            shutil.rmtree(folder)  # a broken leftover
        try:
            os.replace(temp, folder)
        except OSError:
            if not is_our_format(folder):  # else another process converted the same file first
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- Hugging Face hub


def fetch_hub(repo_id: str) -> Path:
    """A Hugging Face hub model (e.g. facebook/mask2former-swin-tiny-coco-panoptic), converted to our format.

    Needs the optional `huggingface_hub` (pip install "mask2former[hub]"); HF_ENDPOINT picks the server.
    """
    converted = home() / "models" / ("hub--" + repo_id.replace("/", "--"))
    if is_our_format(converted):
        return converted
    try:
        import huggingface_hub
    except ImportError:
        raise ZooError(
            f"{repo_id}: Hugging Face hub ids need huggingface_hub (pip install 'mask2former[hub]'), "
            "or download the model folder and pass its path"
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            cache_dir=str(home() / "hub"),
            allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin"],
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=offline(),
        )
    except Exception as error:  # network, missing repo, offline cache miss: all one line for the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise ZooError(
            f"{repo_id}: no such file or folder, and not fetchable as a hub id from {where} ({first}); "
            "download the model folder (config.json + model.safetensors) and pass its path"
        ) from None
    from mask2former.checkpoints.convert import build_and_load, convert_to_ours

    result = convert_to_ours(folder, "hf")
    model = build_and_load(result.config, result.state_dict, repo_id)
    _write_folder_atomically(model.state_dict(), result.config, converted, extra={"source": repo_id})
    return converted
