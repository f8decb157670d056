"""The hybrid families dspark-chat speculates on: text model types whose recurrent and convolution states
engine/hybrid.py rolls back exactly. A plain table, so that the catalog (which imports no torch) can refuse a pair
whose target is not among them before anything is downloaded."""

# Text model types whose stateful layers roll back exactly, with the multi-token scan their modeling module
# calls and the one-token step that replaces it (None: convolution states only). tests/test_hybrid.py checks each
# for greedy identity, and that a multi-token pass continues correctly from a cached state.
SCANS = {
    "lfm2": None,
    "qwen3_5_text": ("torch_chunk_gated_delta_rule", "gated_delta"),
    "qwen3_5_moe_text": ("torch_chunk_gated_delta_rule", "gated_delta"),
    "qwen3_next": ("torch_chunk_gated_delta_rule", "gated_delta"),
    "nemotron_h": ("mamba2_chunk_scan", "mamba2"),
    "granitemoehybrid": ("mamba2_chunk_scan", "mamba2"),
    "falcon_h1": ("mamba2_chunk_scan", "mamba2"),
    "bamba": ("mamba2_chunk_scan", "mamba2"),
}
# Families with such layers that are known not to work, and why. Any other family not in SCANS is refused too.
UNSUPPORTED = {
    "jamba": "transformers runs Jamba's Mamba layers over several tokens from a zero state (its selective scan, "
             "like mamba_ssm's selective_scan_fn, takes no initial state), so a verify pass cannot continue the cache",
}
