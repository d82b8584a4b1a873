"""FID with clean-fid after the protocol's centre-crop + Lanczos step (``sidscale/eval/protocols.py``).

Per image (default protocol): PNG/JPEG -> RGB uint8 -> torchvision-rounded centre crop, PIL Lanczos
256 (``protocol_resize``) -> clean-fid "clean" resize (PIL bicubic on float channels to 299) ->
clean-fid's ``InceptionV3W`` (the TF-Inception torchscript port, pool3, 2048-d). SiD-DiT's protocol
instead feeds the 256 image to the network, which resizes to 299 inside (clean-fid
"legacy_tensorflow"). Both generated and reference images go through the same path, so ``--ref-dir``
statistics and ``tools/ref_stats.py`` statistics are interchangeable when made with the same
protocol; statistics record it (``EvalProtocol.fid_meta``) and a mismatch is refused.
The weights are only ever read from a local file: nothing here downloads.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sidscale.core.io import atomic_write_bytes
from sidscale.eval.frechet import feature_statistics, frechet_distance
from sidscale.eval.images import protocol_resize, sid_dit_fid_resize
from sidscale.eval.protocols import DEFAULT_PROTOCOL, EvalProtocol, get_protocol

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class EvalWeightsError(FileNotFoundError):
    """A metric's weights file is missing: the message names the file and where it is published."""


class RefStatsError(ValueError):
    """Reference statistics made with another FID preprocessing than the selected protocol's."""


def check_inception_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalWeightsError(
            f"--inception-weights {path}: file not found. FID needs the TF-Inception torchscript "
            f"{INCEPTION_FILE} that clean-fid uses, published at {INCEPTION_URL}; download it on a machine "
            "with internet access and pass its local path (nothing is downloaded here)")
    return path


def load_inception(weights: str | os.PathLike, device: str | torch.device = "cpu",
                   protocol: EvalProtocol | None = None) -> FeatureFn:
    """clean-fid's ``InceptionV3W`` from a local file: in "clean" mode the resize to 299 happens
    outside the net, in "legacy_tensorflow" mode (SiD-DiT's protocol) inside it.

    ``InceptionV3W`` takes a directory and a fixed file name; we point it at a private directory
    holding a symlink, so the user's file may have any name and clean-fid's download path
    (``download=True``) is never taken."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = check_inception_file(weights).resolve()
    resize_inside = (protocol or get_protocol(DEFAULT_PROTOCOL)).fid_mode == "legacy_tensorflow"
    with tempfile.TemporaryDirectory(prefix="sidscale-inception-") as d:
        os.symlink(path, Path(d) / INCEPTION_FILE)
        model = InceptionV3W(d, download=False, resize_inside=resize_inside)
    model = model.to(device).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return features


def image_transform(protocol: EvalProtocol):
    """The protocol's step before clean-fid's own (a picklable callable for DataLoader workers)."""
    fn = sid_dit_fid_resize if protocol.fid_round_trip else protocol_resize
    return functools.partial(fn, size=protocol.fid_size)


def files_features(
    files: Sequence[str | os.PathLike], feature_fn: FeatureFn, device: str | torch.device = "cpu",
    batch: int = 64, workers: int = 0, description: str = "", protocol: EvalProtocol | None = None,
) -> np.ndarray:
    """[N, 2048] float features of ``files`` in order, through clean-fid's own dataset/loop."""
    from cleanfid.fid import get_files_features

    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    if not files:
        raise ValueError(f"no images to compute features of ({description or 'empty list'})")
    with torch.no_grad():
        return get_files_features([str(f) for f in files], model=feature_fn, num_workers=workers,
                                  batch_size=batch, device=torch.device(device), mode=protocol.fid_mode,
                                  custom_image_tranform=image_transform(protocol), description=description,
                                  verbose=bool(description))


def timed_features(files: Sequence[Path], feature_fn: FeatureFn, **kw) -> tuple[np.ndarray, float]:
    """(features, images per second)."""
    t0 = time.perf_counter()
    feats = files_features(files, feature_fn, **kw)
    return feats, len(files) / max(time.perf_counter() - t0, 1e-9)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """npz with ``mu``, ``sigma`` (clean-fid's names) and a JSON ``meta`` string; written atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ref-stats {path}: file not found (make it with tools/ref_stats.py)")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"--ref-stats {path}: expected arrays 'mu' and 'sigma', found {sorted(z.files)}")
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        return z["mu"], z["sigma"], meta


def check_stats_protocol(meta: dict, protocol: EvalProtocol, path: str | os.PathLike) -> None:
    """Refuse sidscale-made statistics whose FID preprocessing differs from ``protocol``'s (older
    statistics, e.g. of protocol version 1, cropped one pixel off torchvision's centre on a quarter
    of COCO's images). Statistics without sidscale's metadata (made elsewhere) are the user's call."""
    if "fid_mode" not in meta and "crop" not in meta:
        return
    want = protocol.fid_meta()
    got = {k: meta.get(k) for k in want}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise RefStatsError(f"reference statistics {path} were made with another FID preprocessing than protocol "
                            f"{protocol.name!r}: (theirs, expected) = {diff}; recompute them with tools/ref_stats.py "
                            f"--protocol {protocol.name}")


def folder_stats_meta(files: Sequence[Path], folder: Path, weights: Path,
                      protocol: EvalProtocol | None = None) -> dict:
    """What a cached reference-statistics file must match to be reused."""
    st = Path(weights).stat()
    return {"images": str(Path(folder).resolve()), "num_images": len(files),
            **(protocol or get_protocol(DEFAULT_PROTOCOL)).fid_meta(),
            "inception_weights": {"name": Path(weights).name, "size": st.st_size}}


def cached_folder_stats(
    folder: Path, out: Path, weights: Path, feature_fn: FeatureFn | None = None, force: bool = False,
    protocol: EvalProtocol | None = None, **kw,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Statistics of every image under ``folder``; reuse ``out`` when it was made from the same folder,
    image count, FID protocol (and its version) and weights file (40k COCO features take a while)."""
    from sidscale.eval.images import list_image_files

    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    files = list_image_files(folder)
    if len(files) < 2:
        raise ValueError(f"--ref-dir {folder}: found {len(files)} images, need at least 2")
    meta = folder_stats_meta(files, folder, weights, protocol)
    if Path(out).is_file() and not force:
        mu, sigma, old = load_stats(out)
        if old == meta:
            return mu, sigma, meta
    feature_fn = feature_fn or load_inception(weights, kw.get("device", "cpu"), protocol)
    feats = files_features(files, feature_fn, protocol=protocol, **kw)
    mu, sigma = feature_statistics(feats)
    save_stats(out, mu, sigma, meta)
    return mu, sigma, meta


def fid_from_features(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of [N, D] features against N(ref_mu, ref_sigma).

    N > D (the FID-30k case): the standard formula (``frechet_distance``, scipy sqrtm, as clean-fid).
    N <= D (quick FID-1k checks, tests): the sample covariance S = X^T X / (N-1) is singular, where
    sqrtm is slow and needs an eps fudge; but the nonzero eigenvalues of S R equal those of the
    N x N PSD matrix X R X^T / (N-1), so tr (S R)^(1/2) = sum sqrt(eig(X R X^T / (N-1))), exactly.
    """
    f = np.asarray(feats, dtype=np.float64)
    n, d = f.shape
    if n > d:
        return frechet_distance(*feature_statistics(f), ref_mu, ref_sigma)
    if n < 2:
        raise ValueError(f"need at least 2 images for FID, got {n}")
    mu = f.mean(axis=0)
    x = f - mu
    r = np.asarray(ref_sigma, dtype=np.float64)
    m = x @ r @ x.T / (n - 1)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu - np.asarray(ref_mu, dtype=np.float64)
    return float(diff @ diff + (x * x).sum() / (n - 1) + np.trace(r) - 2 * tr_covmean)
