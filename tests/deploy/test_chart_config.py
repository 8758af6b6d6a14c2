"""The chart's settings reach the server as intended: the rendered ConfigMap and args, given to the real
command line (service/lmserve/cli.py), build exactly the expected ServeConfig; the chart's defaults are the
server's; every variable the chart sets is one the server reads.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import pytest

from lmserve.cli import build_parser, serve_config_from_args
from lmserve.config import DEFAULT_MODEL, EngineConfig, LimitsConfig, ServeConfig, VLLMConfig
from tests.deploy.conftest import REPO, VARIANTS, Helm, Rendered

CONFIG_LAYER = (REPO / "service" / "lmserve" / "config.py", REPO / "service" / "lmserve" / "cli.py")


def serve_subparser(env: dict[str, str]) -> argparse.ArgumentParser:
    parser = build_parser(env)
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices["serve"]


def config_of(r: Rendered) -> ServeConfig:
    """What `lmserve serve` builds from the container's args and the ConfigMap's environment."""
    env = dict(r.env)
    args = r.container["args"]
    known = serve_subparser(env)._option_string_actions
    unknown = [a for a in args[1:] if a.startswith("--") and a not in known]
    if unknown:  # flags of work not merged yet (the safety filter); once it lands this check runs
        pytest.skip(f"`lmserve serve` has no {unknown} yet")
    parsed = build_parser(env).parse_args(args)
    assert parsed.command == "serve"
    return serve_config_from_args(parsed, env)


def test_every_variable_the_chart_sets_is_read_by_the_server(rendered: dict[str, Rendered]) -> None:
    read = set().union(*(re.findall(r"LMSERVE_[A-Z0-9_]+", path.read_text()) for path in CONFIG_LAYER))
    for name, r in rendered.items():
        set_by_chart = set(r.env)
        assert set_by_chart <= read, f"{name}: the server reads no {sorted(set_by_chart - read)}"
        assert all(isinstance(v, str) for v in r.env.values())


def test_defaults_are_the_servers(rendered: dict[str, Rendered]) -> None:
    config = config_of(rendered["default"])
    expected = replace(
        ServeConfig(),
        host="0.0.0.0",  # reachable in the pod
        cache_dir=Path("/var/cache/lmserve"),  # the cache volume
        # the CPU limit, not the node's cores; the kernels built into the cache volume
        engine=replace(EngineConfig(), num_threads=2, cache_dir=Path("/var/cache/lmserve")),
    )
    assert config == expected
    assert config.model == DEFAULT_MODEL  # no LMSERVE_MODEL: the image's default applies


def test_every_setting_lands_in_the_server_config(helm: Helm) -> None:
    values = {
        "model": "/models/Qwen2.5-0.5B-Instruct",
        "embeddingModel": "none",
        "rerankModel": "/models/bge-reranker-base",
        # The native engine: --engine vllm refuses --device, --attention and --num-threads (vLLM decides
        # them; tests/engine/test_vllm_settings.py), which this case sets.
        "engine": "native",
        "server": {
            "dtype": "bfloat16", "device": "cuda:1", "kvCacheMemoryGiB": 0.75, "numKvBlocks": 4096, "blockSize": 32,
            "maxNumSeqs": 64, "maxNumBatchedTokens": 2048, "maxModelLen": 8192, "prefixCaching": False,
            "numThreads": 3, "attention": "torch", "kernelVariant": "avx2", "toolCallParser": "mistral", "reasoningParser": "qwen3", "quantization": "int8", "allowPickle": True, "logFormat": "text", "logLevel": "debug",
            "logPrompts": True, "corsOrigins": ["https://a.example", "https://b.example"],
            "otlpEndpoint": "http://otel-collector:4318",
        },
        "limits": {
            "maxRequestBodyBytes": 8388608, "maxN": 2, "maxTokensCap": 1024, "maxStopStrings": 3, "maxPrompts": 5,
            "maxQueue": 17, "requestsPerMinute": 600, "tokensPerMinute": 100000, "embeddingMaxBatchTokens": 4096,
            "maxEmbeddingInputs": 99, "maxRerankDocuments": 50, "queueTimeoutSeconds": 2.5,
            "responsesStoreMaxResponses": 7, "responsesStoreMaxBytes": 4096,
        },
        "ports": {"http": 9000, "grpc": 0},
        "apiKeys": {"existingSecret": "keys", "secretKey": "list"},
        "metrics": {"open": True},
        "drain": {"timeoutSeconds": 45},
        "cache": {"mountPath": "/cache"},
    }  # fmt: skip
    config = config_of(helm.template(values))
    assert config == ServeConfig(
        model="/models/Qwen2.5-0.5B-Instruct",
        embedding_model=None,
        rerank_model="/models/bge-reranker-base",
        tool_call_parser="mistral",
        reasoning_parser="qwen3",
        host="0.0.0.0",
        port=9000,
        grpc_port=0,
        engine_kind="native",
        api_key_file="/etc/lmserve/api-keys/api-keys",
        metrics_open=True,
        cors_origins=("https://a.example", "https://b.example"),
        log_format="text",
        log_level="debug",
        log_prompts=True,
        otlp_endpoint="http://otel-collector:4318",
        drain_timeout_s=45.0,
        cache_dir=Path("/cache"),
        engine=EngineConfig(
            dtype="bfloat16", device="cuda:1", block_size=32, kv_cache_memory_bytes=int(0.75 * 2**30),
            num_kv_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192,
            enable_prefix_caching=False, attention="torch", quantization="int8", num_threads=3, allow_pickle=True,
            cache_dir=Path("/cache"), kernel_variant="avx2",
        ),
        limits=LimitsConfig(
            max_request_body_bytes=8388608, max_n=2, max_tokens_cap=1024, max_stop_strings=3, max_prompts=5,
            max_queue=17, requests_per_minute=600, tokens_per_minute=100000, embedding_max_batch_tokens=4096,
            max_embedding_inputs=99, max_rerank_documents=50, queue_timeout_s=2.5, responses_store_max_responses=7,
            responses_store_max_bytes=4096,
        ),
    )  # fmt: skip
    assert config_of(helm.template({"limits": {"queueTimeoutSeconds": 0}})).limits.queue_timeout_s == 0


def test_vllm_settings_land_in_the_server_config(helm: Helm) -> None:
    """engine: vllm with the default resources (a CPU limit, which sets the native engine's threads) and
    every vLLM setting: the server accepts the result and gets each value."""
    vllm = {"tensorParallelSize": 2, "pipelineParallelSize": 3, "gpuMemoryUtilization": 0.85,
            "distributedExecutorBackend": "ray"}  # fmt: skip
    config = config_of(helm.template({"engine": "vllm", "vllm": vllm}))
    assert config.engine_kind == "vllm"
    assert config.vllm == replace(
        VLLMConfig(), tensor_parallel_size=2, pipeline_parallel_size=3, gpu_memory_utilization=0.85,
        distributed_executor_backend="ray",
    )  # fmt: skip
    assert config_of(helm.template({"engine": "vllm"})).vllm == VLLMConfig()
    for bad, message in [
        ({"vllm": {"tensorParallelSize": 2}}, "vllm.* settings need engine: vllm"),
        ({"engine": "vllm", "server": {"numThreads": 4}}, "server.numThreads is not used with engine: vllm"),
        ({"engine": "vllm", "server": {"quantization": "int8"}}, "server.quantization is not used with engine: vllm"),
        ({"engine": "vllm", "server": {"kernelVariant": "avx2"}}, "server.kernelVariant is not used with engine: vllm"),
    ]:
        assert message in helm.template_error(bad)


def test_speculative_decoding_values_reach_the_engine(helm: Helm) -> None:
    engine = config_of(helm.template({"server": {"speculativeTokens": 5, "promptLookupMin": 1, "promptLookupMax": 3}})).engine
    assert (engine.speculative_tokens, engine.prompt_lookup_min, engine.prompt_lookup_max) == (5, 1, 3)
    assert config_of(helm.template({})).engine.speculative_tokens == 0


# Variables the server reads that the chart sets some other way, with the value that does it.
SET_OTHERWISE = {
    "LMSERVE_API_KEYS": "apiKeys.existingSecret (a file: LMSERVE_API_KEY_FILE; keys never sit in values)",
    "LMSERVE_NO_SAFETY": "safety.disabled (the --no-safety flag)",
    "LMSERVE_SAFETY_POLICY": "safety.policy (a mounted file, the --safety-policy flag)",
}


def test_every_variable_the_server_reads_has_a_chart_value(rendered: dict[str, Rendered], helm: Helm) -> None:
    """The other direction: every setting of `lmserve serve` can be given by value."""
    read = set().union(*(re.findall(r"LMSERVE_[A-Z0-9_]+", path.read_text()) for path in CONFIG_LAYER))
    everything = helm.template({
        "engine": "vllm", "embeddingModel": "none", "rerankModel": "/models/reranker", "apiKeys": {"existingSecret": "k"}, "grpcTls": {"existingSecret": "t", "requireClientCert": True},
        "limits": {"queueTimeoutSeconds": 1, "maxQueue": 3, "maxN": 2, "maxTokensCap": 9, "maxStopStrings": 2,
                   "maxPrompts": 2, "requestsPerMinute": 1, "tokensPerMinute": 1, "embeddingMaxBatchTokens": 9,
                   "maxEmbeddingInputs": 2, "maxRerankDocuments": 3, "maxRequestBodyBytes": 999,
                   "responsesStoreMaxResponses": 2, "responsesStoreMaxBytes": 99},
        "vllm": {"tensorParallelSize": 1, "pipelineParallelSize": 1, "gpuMemoryUtilization": 0.5,
                 "distributedExecutorBackend": "mp"},
        "lora": {"modules": [{"name": "a", "path": "/a"}], "maxCpuLoras": 8},
        "server": {"numKvBlocks": 9, "kvCacheMemoryGiB": 2, "blockSize": 32, "otlpEndpoint": "http://x:4318", "corsOrigins": ["https://a.example"],
                   "maxNumSeqs": 2, "maxNumBatchedTokens": 64, "maxModelLen": 128, "promptLookupMin": 1,
                   "promptLookupMax": 3, "toolCallParser": "hermes", "reasoningParser": "qwen3"},
    })  # fmt: skip
    set_by_chart = set(everything.env).union(*(set(r.env) for r in rendered.values()))
    missing = read - set_by_chart - set(SET_OTHERWISE)
    assert not missing, f"no chart value sets {sorted(missing)}"
    assert not set(SET_OTHERWISE) & set_by_chart


def test_lora_values_reach_the_server(helm: Helm) -> None:
    values = {"lora": {"modules": [{"name": "sql", "path": "/models/adapters/sql"}, {"name": "chat", "path": "/a/chat"}],
                       "maxLoras": 6, "maxLoraRank": 32, "maxCpuLoras": 12, "allowRuntime": True}}  # fmt: skip
    engine = config_of(helm.template(values)).engine
    assert engine.lora_modules == (("sql", Path("/models/adapters/sql")), ("chat", Path("/a/chat")))
    assert (engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras, engine.allow_runtime_lora) == (6, 32, 12, True)
    error = helm.template_error({"lora": {"modules": [{"name": "a,b", "path": "/x"}]}})
    assert "lora" in error and "modules" in error


def test_served_names_reach_the_server(rendered: dict[str, Rendered]) -> None:
    config = config_of(rendered["persistent-cache"])
    assert config.served_model_names == ("qwen-chat", "gpt-4o-mini")
    assert config.served_embedding_model_names == ("text-embedding-3-small",)
    assert config_of(rendered["default"]).served_model_names == ()


def test_grpc_tls_files_reach_the_server(rendered: dict[str, Rendered], helm: Helm) -> None:
    r = rendered["grpc-tls"]
    config = config_of(r)
    mount = next(m for m in r.container["volumeMounts"] if m["name"] == "grpc-tls")
    directory = Path(mount["mountPath"])
    assert mount["readOnly"] is True
    assert (config.grpc_tls_cert, config.grpc_tls_key, config.grpc_tls_client_ca) == (
        directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    )
    volume = next(v for v in r.pod["volumes"] if v["name"] == "grpc-tls")
    assert volume["secret"]["secretName"] == "lmserve-grpc-tls"
    assert {i["path"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    grpc_port = next(p for p in r.one("Service")["spec"]["ports"] if p["name"] == "grpc")
    assert "appProtocol" not in grpc_port  # not h2c: TLS
    server_only = config_of(helm.template({"grpcTls": {"existingSecret": "s"}}))
    assert server_only.grpc_tls_cert is not None and server_only.grpc_tls_client_ca is None
    assert config_of(rendered["default"]).grpc_tls_cert is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_parses(rendered: dict[str, Rendered], variant: str) -> None:
    config = config_of(rendered[variant])
    assert config.port == int(rendered[variant].env["LMSERVE_PORT"])
    assert str(config.cache_dir) == rendered[variant].env["LMSERVE_CACHE_DIR"]
