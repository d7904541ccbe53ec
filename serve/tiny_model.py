"""Builds the embedded default model: a small Qwen3-architecture causal LM with random weights from a
fixed seed and a byte-level BPE tokenizer trained on the spot, cached on local disk.

It exists so that the service and the tests need no model hub. It knows nothing about adapters or
serving; it only writes an ordinary Hugging Face model directory that `from_pretrained` can load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "online-llm/tiny-qwen3"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Same shape as Qwen3's template, without tools: role headers, <|im_end|> after each turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the generated model; the defaults are the test fixture, larger ones serve benchmarks."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    seed: int = 1234

    def key(self) -> str:
        """Short stable hash of the spec: the cache directory name."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


BENCH_SPEC = TinyModelSpec(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=64, intermediate_size=1408,
                           vocab_size=4096)


def _corpus() -> list[str]:
    """A deterministic English-ish corpus for the tokenizer: enough variety for a useful BPE."""
    words = ("the a an of to and in is it you that he was for on are with as his they be at one have "
             "this from or had by word but what some we can out other were all there when up use your "
             "how said each she which do their time if will way about many then them write would like "
             "so these her long make thing see him two has look more day could go come did number sound "
             "no most people my over know water than call first who may down side been now find any new "
             "work part take get place made live where after back little only round man year came show "
             "every good me give our under name very through just form sentence great think say help low "
             "line differ turn cause much mean before move right boy old too same tell does set three "
             "want air well also play small end put home read hand port large spell add even land here "
             "must big high such follow act why ask men change went light kind off need house picture "
             "try us again animal point mother world near build self earth father adapter model learn "
             "answer question capital paris france berlin germany rome italy madrid spain tokyo japan "
             "blue green red yellow color sky ocean river mountain city country language python code").split()
    lines = []
    for i in range(4000):  # a simple LCG keeps this independent of Python's hash seed
        n, x = 6 + i % 9, (i * 2654435761) % 2**32
        picked = []
        for _ in range(n):
            x = (1103515245 * x + 12345) % 2**31
            picked.append(words[x % len(words)])
        lines.append(" ".join(picked) + ("." if i % 3 else "?") + f" {i % 100} {i * 7 % 1000}")
    return lines


def _build_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    return fast


def _build_model(spec: TinyModelSpec, tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, torch_dtype="float32",
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id)
    return model


def default_cache_dir() -> Path:
    root = os.environ.get("ONLINE_LLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "online-llm")
    return Path(root)


def build_tiny_model(dest: str | os.PathLike | None = None, spec: TinyModelSpec = TinyModelSpec(),
                     *, force: bool = False) -> Path:
    """Return a local model directory for `spec`, building it once (about a second for the default).

    The write goes to a temporary sibling directory that is renamed into place, so concurrent
    builders (test workers, Ray replicas) never see a half-written model.
    """
    target = Path(dest) if dest else default_cache_dir() / f"tiny-qwen3-{spec.key()}"
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tokenizer = _build_tokenizer(spec)
    model = _build_model(spec, tokenizer)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "online_llm_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical (same seed)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model at %s", target)
    return target


def resolve_model(model: str | None) -> str:
    """Map the embedded default's id (or None) to its local directory; pass anything else through."""
    if model in (None, "", TINY_MODEL_ID, "tiny"):
        return str(build_tiny_model())
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny model directory.")
    parser.add_argument("--dest", default=None)
    parser.add_argument("--bench", action="store_true", help="the larger benchmark model")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.dest, BENCH_SPEC if args.bench else TinyModelSpec(), force=args.force))


if __name__ == "__main__":
    main()
