"""textgen.server: one model shard (`textgen-server serve`), executing the router's batches.

cli.py           argparse -> ServerConfig -> server.serve
config.py        ServerConfig (frozen; the CLI's defaults)
server.py        process lifetime: process group, grpc.aio on unix://{uds}-{rank}, signals
servicer.py      the proto's RPCs: serialised, errors -> status codes
shard.py         Info/Warmup/Prefill/Decode/FilterBatch/ClearCache on protobuf messages
validation.py    request checks against the shard's limits (vocab, blocks, slots)
batch.py         Batch / RequestState: the shard's state between steps
sampling.py      logits pipeline (penalties, temperature, warpers) and the seeded draw
model_runner.py  packed forward over the paged cache -> per-sequence logits
kv_cache.py      KVCacheSpec (sizing) and KVCache (per-layer key/value blocks)
weights.py       safetensors reader with per-rank slicing
distributed.py   ParallelGroup: rank, world size, all-reduce/all-gather
attention/       AttentionBackend interface + registry ("cpu")
layers/          tensor-parallel linear, embedding, LM head, RMSNorm, rotary
models/          CausalLM interface + registry by config.model_type ("llama")
"""
