#!/usr/bin/env bash
# Builds HERE (a machine that reaches PyPI) the wheelhouse that a bare GPU machine without network needs
# to run sidscale: the packages sidscale imports that its image lacks, as CPython 3.12 x86-64 wheels, with
# no torch (the machine brings its own). The GPU check's run command carries the folder and installs it
# there with `pip install --no-index --no-deps --target` (tools/gpu_check.sh does it when it finds the
# folder and deepspeed is missing; README "GPU check").
#
#   bash tools/gpu_wheels.sh                 # -> .gpu_wheels/ (git-ignored), about 10 MB
#   bash tools/gpu_wheels.sh DIR             # elsewhere
#   PY=/path/to/python bash tools/gpu_wheels.sh   # the python that builds DeepSpeed (default .venv/bin/python)
#
# - DeepSpeed ships an sdist only: built here into a pure-Python wheel with no op prebuilt
#   (DS_BUILD_OPS=0: the GPU check's settings use torch Adam and no fused kernel; an optimizer-offload
#   config without zero_force_ds_cpu_optimizer=false would JIT-build DeepSpeedCPUAdam at first use).
# - Everything else: `pip download --only-binary=:all: --python-version 3.12` for manylinux x86-64, no deps;
#   the dependencies are listed by hand and checked below: every requirement of every wheel must be in
#   the wheelhouse or on the image (IMAGE_HAS: the GPU image's package list as this workplace
#   documents it, 2026-11), so a missing one fails here, not in the 15-minute slot.
# - Versions: the ones this project tests with (setup.cfg ranges, the dev venv). One version per name.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu_wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MAX_MIB=50

# name==version: what sidscale needs and the GPU image lacks, and their own missing dependencies
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0   # diffusers
  webdataset==1.0.2 braceexpand==0.1.7                                 # webdataset
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4                    # open_clip (CLIP BPE vocabulary, CLIP score)
  clean-fid==0.1.35                                                    # FID (sidscale.eval.fid)
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5                  # DeepSpeed's config parsing
  annotated-types==0.8.0 typing-inspection==0.4.5                      # pydantic
  typing_extensions==4.16.0                                            # pydantic needs >= 4.16 (the image's version is undocumented)
)
DEEPSPEED=deepspeed==0.19.8
# the GPU image's Python packages (normalised names) and the versions documented for some of them
IMAGE_VERSIONS="torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 huggingface-hub==1.33.0 safetensors==0.8.0
numpy==2.5.2 tokenizers==0.23.2 accelerate==1.15.0 sentencepiece==0.2.2"
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"

tmp="$OUT.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
echo "gpu_wheels: building $DEEPSPEED (pure Python, DS_BUILD_OPS=0) with $PY"
# --no-build-isolation: DeepSpeed's setup.py imports torch (the builder's; nothing of it enters the wheel)
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir \
  --no-binary deepspeed -w "$tmp" "$DEEPSPEED"
echo "gpu_wheels: downloading ${#WHEELS[@]} wheels for CPython 3.12, manylinux x86-64"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp" "${WHEELS[@]}"

# every wheel py3 / cp312 / abi3, and every requirement met by the wheelhouse or the image
"$PY" - "$tmp" "$IMAGE_HAS" "$IMAGE_VERSIONS" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, image = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
versions = {canonicalize_name(n): v for n, v in (x.split("==") for x in sys.argv[3].split())}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
wheels, problems = {}, []
for whl in sorted(folder.glob("*.whl")):
    name, _, _, tags = parse_wheel_filename(whl.name)
    if name in wheels:
        problems.append(f"two versions of {name}: {wheels[name].name}, {whl.name}")
    wheels[name] = whl
    if not any(t.interpreter in ("py3", "cp312") or t.abi == "abi3" for t in tags):
        problems.append(f"{whl.name} is not for CPython 3.12")
for name, whl in wheels.items():
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another platform / Python
        dep = canonicalize_name(req.name)
        if dep in wheels:
            have = parse_wheel_filename(wheels[dep].name)[1]
        elif dep in image:
            have = versions.get(dep)  # None: a version the image's documentation does not give
        else:
            problems.append(f"{whl.name} requires {req}: neither in the wheelhouse nor on the GPU image")
            continue
        if have is not None and not req.specifier.contains(str(have), prereleases=True):
            problems.append(f"{whl.name} requires {req}, the {'wheelhouse' if dep in wheels else 'image'} has {have}")
if problems:
    sys.exit("gpu_wheels: " + "\n  ".join(["the wheelhouse is incomplete:", *problems]))
print(f"gpu_wheels: {len(wheels)} wheels, every requirement met (wheelhouse or GPU image)")
EOF

size_kib=$(du -sk "$tmp" | cut -f1)
if [ "$size_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "gpu_wheels: $((size_kib / 1024)) MiB > $MAX_MIB MiB (what the device call carries must stay small)" >&2
  exit 1
fi
rm -rf "$OUT"
mv "$tmp" "$OUT"
echo "gpu_wheels: $OUT ($(ls "$OUT" | wc -l) wheels, $((size_kib / 1024)) MiB)"
