"""The toy target: a byte-level BPE tokenizer and a small Qwen3 model pretrained on CPU.

The corpus is the benchmark prompt files. Each row becomes a chat conversation
(see ``conversation_messages``), rows with ``index % heldout_every == 0`` are
held out for perplexity, and the rest are packed into fixed-length windows for
next-token pretraining. The result is a normal Hugging Face model directory,
cached under ``<cache_root>/toy-target/<key>/`` where the key hashes the
settings, the corpus and ``FORMAT_VERSION``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from deepspec import __version__
from deepspec.config import ConfigError, ToyTargetConfig
from deepspec.logs import Progress
from deepspec.manifest import canonical_json, fsync_dir
from deepspec.runtime import bulk_compute_threads

logger = logging.getLogger(__name__)

# Bump when the build recipe changes, so that old cached targets are not reused.
FORMAT_VERSION = 2
CACHE_DIR_ENV = "DEEPSPEC_CACHE_DIR"
METADATA_NAME = "toy_target.json"

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
# The list order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, <|mask|>=3.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, MASK_TOKEN)
PAD_ID, IM_START_ID, IM_END_ID, MASK_ID = range(4)

# Qwen-style template. Extra variables such as enable_thinking are ignored because Jinja
# leaves unused variables alone. There is no default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is none or message['content'] is undefined -%}"
    "{%- set content = '' -%}"
    "{%- elif message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{{- raise_exception('message content must be a string or null') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Schedule and optimizer settings that the config does not expose.
ADAM_BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1
MAX_GRAD_NORM = 1.0
FINAL_LOSS_WINDOW = 20

_WHITESPACE_RUN = re.compile(r"\s+")


def toy_cache_root() -> Path:
    """Return ``$DEEPSPEC_CACHE_DIR`` if set, else ``~/.cache/deepspec``."""
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "deepspec"


def read_corpus_rows(files: Sequence[Path]) -> list[list[str]]:
    """Read the ``turns`` list of every JSONL row of ``files``, in file and line order.

    Blank lines are skipped. A line that is not a JSON object with a non-empty
    list of strings under ``turns`` raises ValueError naming the file and line.
    """
    rows: list[list[str]] = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                rows.append(_parse_corpus_line(line, Path(file), line_number))
    return rows


def _parse_corpus_line(line: str, file: Path, line_number: int) -> list[str]:
    where = f"{file}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict) or "turns" not in record:
        raise ValueError(f'{where}: expected a JSON object with a "turns" list of strings')
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f'{where}: "turns" must be a non-empty list of strings, got {str(turns)[:80]!r}')
    return turns


def corpus_sha256(rows: Sequence[Sequence[str]]) -> str:
    """Hash the rows as canonical JSON, so the same text in other files gives the same hash."""
    return hashlib.sha256(canonical_json([list(row) for row in rows]).encode("utf-8")).hexdigest()


def toy_target_key(cfg: ToyTargetConfig, corpus_hash: str) -> str:
    """Return the 16-hex-digit cache key of a toy target built from ``cfg`` and a corpus hash."""
    payload = canonical_json({"format": FORMAT_VERSION, "settings": cfg.model_dump(mode="json"), "corpus": corpus_hash})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def continuation_split(text: str, user_fraction: float) -> tuple[str, str]:
    """Cut ``text`` at the whitespace run nearest to ``user_fraction`` of its length.

    Runs made only of line breaks are used only when the text has no other
    whitespace: a prompt whose last line is a fixed instruction would otherwise
    always be cut before that line. The whitespace at the cut belongs to neither
    part. A text without inner whitespace is cut at the character position.
    """
    target = int(len(text) * user_fraction)
    runs = [match for match in _WHITESPACE_RUN.finditer(text) if 0 < match.start() and match.end() < len(text)]
    candidates = [match for match in runs if match.group().strip("\r\n")] or runs
    if not candidates:
        if len(text) < 2:
            return text, ""
        cut = min(max(target, 1), len(text) - 1)
        return text[:cut], text[cut:]
    best = min(candidates, key=lambda match: abs(match.start() - target))
    return text[: best.start()], text[best.end() :]


def conversation_messages(turns: Sequence[str], user_fraction: float) -> list[dict[str, str]]:
    """Turn a corpus row into chat messages for pretraining.

    A single turn is split by ``continuation_split`` into a user prompt and the
    assistant's continuation; several turns alternate user and assistant.
    """
    if len(turns) == 1:
        user, assistant = continuation_split(turns[0], user_fraction)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    roles = ("user", "assistant")
    return [{"role": roles[index % 2], "content": turn} for index, turn in enumerate(turns)]


def is_heldout_row(index: int, heldout_every: int) -> bool:
    return index % heldout_every == 0


def train_tokenizer(
    texts: Iterator[str] | Sequence[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the chat special tokens and template.

    The vocabulary can come out smaller than ``vocab_size`` when the text has
    too few distinct pairs to merge.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_model(cfg: ToyTargetConfig) -> Qwen3ForCausalLM:
    """Create a randomly initialised Qwen3 model (call ``torch.manual_seed`` first for reproducible weights)."""
    config = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID)
    return model


def check_toy_config(cfg: ToyTargetConfig) -> None:
    """Raise ConfigError for settings that the schema accepts but the model cannot use."""
    prefix = "target.toy"
    if cfg.num_attention_heads % cfg.num_key_value_heads != 0:
        raise ConfigError(
            f"{prefix}.num_key_value_heads={cfg.num_key_value_heads} must divide "
            f"{prefix}.num_attention_heads={cfg.num_attention_heads}; pick a divisor such as 1 or 2"
        )
    if cfg.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"{prefix}.seq_len={cfg.seq_len} exceeds {prefix}.max_position_embeddings="
            f"{cfg.max_position_embeddings}; lower seq_len or raise max_position_embeddings"
        )


@dataclass(frozen=True)
class PretrainStats:
    steps: int
    tokens: int
    seconds: float
    final_loss: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class HeldoutStats:
    tokens: int
    loss: float
    top1_accuracy: float
    mean_max_prob: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def packed_batches(
    documents: Sequence[torch.Tensor], seq_len: int, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, seq_len]`` batches of packed token windows, forever.

    Every epoch shuffles the document order, concatenates the documents, cuts
    the stream into ``seq_len`` windows and shuffles the windows. The tail shorter
    than a window is dropped in that epoch only. Shuffling the windows matters
    because consecutive windows often come from one long document: without it the
    default config reached held-out perplexity 131 instead of 65 after 300 steps.
    """
    total = sum(len(document) for document in documents)
    if total < seq_len:
        raise ValueError(
            f"the pretraining corpus has {total} tokens, fewer than one window of seq_len={seq_len}; "
            "add corpus rows or lower target.toy.seq_len"
        )
    rng = random.Random(seed)
    order = list(range(len(documents)))
    pending: list[torch.Tensor] = []
    while True:
        rng.shuffle(order)
        stream = torch.cat([documents[index] for index in order])
        windows = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
        rng.shuffle(windows)
        for window in windows:
            pending.append(window)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to MIN_LR_RATIO at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: ToyTargetConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on norm weights."""
    decayed = [parameter for parameter in model.parameters() if parameter.ndim >= 2]
    others = [parameter for parameter in model.parameters() if parameter.ndim < 2]
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS)


def pretrain(
    model: Qwen3ForCausalLM,
    batches: Iterator[torch.Tensor],
    cfg: ToyTargetConfig,
    steps: int | None = None,
    frozen_rows: Sequence[int] = (MASK_ID,),
) -> PretrainStats:
    """Run ``steps`` (default ``cfg.pretrain_steps``) optimizer steps of next-token training.

    The embedding rows in ``frozen_rows`` are restored after every step, so a
    token that never occurs keeps its initial vector even though the tied LM head
    and weight decay would otherwise move it.
    """
    total_steps = cfg.pretrain_steps if steps is None else steps
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, cfg.warmup_steps, total_steps)
    )
    embedding = model.get_input_embeddings().weight
    frozen_index = torch.tensor(list(frozen_rows), dtype=torch.long)
    frozen_values = embedding.detach()[frozen_index].clone()
    progress = Progress(logger, "step", total_steps)
    recent_losses: list[float] = []
    tokens = 0

    model.train()
    started = time.perf_counter()
    for step in range(total_steps):
        batch = next(batches)
        loss_value = _train_step(model, batch, optimizer, cfg.bf16_autocast)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"toy target pretraining loss is {loss_value} at step {step + 1}; lower target.toy.lr")
        scheduler.step()
        with torch.no_grad():
            embedding[frozen_index] = frozen_values

        tokens += batch.numel()
        recent_losses = (recent_losses + [loss_value])[-FINAL_LOSS_WINDOW:]
        elapsed = time.perf_counter() - started
        progress.update(1, f"loss={loss_value:.3f} lr={scheduler.get_last_lr()[0]:.2e} tok/s={tokens / elapsed:,.0f}")
    seconds = time.perf_counter() - started
    progress.finish(f"loss={sum(recent_losses) / len(recent_losses):.3f} tok/s={tokens / seconds:,.0f}")
    model.eval()
    return PretrainStats(
        steps=total_steps, tokens=tokens, seconds=seconds, final_loss=sum(recent_losses) / len(recent_losses)
    )


def _train_step(model: Qwen3ForCausalLM, batch: torch.Tensor, optimizer: torch.optim.Optimizer, bf16: bool) -> float:
    """Run forward, backward, gradient clipping and one optimizer step, and return the loss.

    A non-finite loss skips the update so that the caller can raise with the step number.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


@torch.no_grad()
def evaluate_heldout(model: Qwen3ForCausalLM, tokens: torch.Tensor, seq_len: int, batch_size: int) -> HeldoutStats:
    """Measure next-token loss, top-1 accuracy and mean max-probability in fp32.

    The token stream is cut into ``seq_len`` windows like the training data, so
    the first token of each window is not predicted.
    """
    windows = [tokens[start : start + seq_len] for start in range(0, len(tokens), seq_len)]
    windows = [window for window in windows if len(window) >= 2]
    if not windows:
        raise ValueError("the held-out rows have fewer than 2 tokens; add corpus rows or lower heldout_every")
    model.eval()
    loss_sum = 0.0
    correct = 0
    max_prob_sum = 0.0
    predicted = 0
    full = [window for window in windows if len(window) == seq_len]
    groups = [torch.stack(full[start : start + batch_size]) for start in range(0, len(full), batch_size)]
    groups += [window.unsqueeze(0) for window in windows if len(window) < seq_len]
    for batch in groups:
        logits = model(input_ids=batch).logits[:, :-1].float()
        labels = batch[:, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        loss_sum += -log_probs.gather(-1, labels.unsqueeze(-1)).sum().item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        max_prob_sum += log_probs.max(dim=-1).values.exp().sum().item()
        predicted += labels.numel()
    return HeldoutStats(
        tokens=predicted,
        loss=loss_sum / predicted,
        top1_accuracy=correct / predicted,
        mean_max_prob=max_prob_sum / predicted,
    )


@dataclass(frozen=True)
class SplitCorpus:
    """Corpus rows as chat conversations, split into pretraining and held-out sets."""

    train: list[list[dict[str, str]]]
    heldout: list[list[dict[str, str]]]
    dropped: int


def split_corpus(rows: Sequence[Sequence[str]], cfg: ToyTargetConfig) -> SplitCorpus:
    """Convert rows to conversations; row ``i`` is held out when ``i % cfg.heldout_every == 0``."""
    train: list[list[dict[str, str]]] = []
    heldout: list[list[dict[str, str]]] = []
    dropped = 0
    for index, turns in enumerate(rows):
        # A literal special-token string in the text would be encoded as that special
        # token and give it training signal, so such rows are left out.
        if any(token in turn for turn in turns for token in SPECIAL_TOKENS):
            dropped += 1
            continue
        messages = conversation_messages(turns, cfg.user_fraction)
        (heldout if is_heldout_row(index, cfg.heldout_every) else train).append(messages)
    if not train or not heldout:
        raise ValueError(
            f"the toy target corpus has {len(train)} train and {len(heldout)} held-out rows; both must be non-empty "
            f"(held out: row index % heldout_every == 0, heldout_every={cfg.heldout_every}); add corpus rows"
        )
    return SplitCorpus(train=train, heldout=heldout, dropped=dropped)


def tokenizer_texts(conversations: Sequence[list[dict[str, str]]]) -> Iterator[str]:
    """Yield ``role\ncontent`` per message: the tokenizer's training text, without special tokens."""
    for messages in conversations:
        for message in messages:
            yield f"{message['role']}\n{message['content']}"


def encode_conversations(
    tokenizer: PreTrainedTokenizerFast, conversations: Sequence[list[dict[str, str]]]
) -> list[torch.Tensor]:
    """Render each conversation with the chat template and return its token ids."""
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    # verbose=False: conversations longer than model_max_length are expected here because they are packed.
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded]


def _build_toy_target(cfg: ToyTargetConfig, rows: Sequence[Sequence[str]], out_dir: Path) -> dict[str, Any]:
    """Train the tokenizer and the model, save both to ``out_dir`` and return the metadata."""
    started = time.perf_counter()
    corpus = split_corpus(rows, cfg)
    if corpus.dropped:
        logger.warning("left out %d corpus rows that contain special-token text", corpus.dropped)

    tokenizer = train_tokenizer(tokenizer_texts(corpus.train), cfg.vocab_size, cfg.max_position_embeddings)
    train_documents = encode_conversations(tokenizer, corpus.train)
    heldout_tokens = torch.cat(encode_conversations(tokenizer, corpus.heldout))
    train_token_count = sum(len(document) for document in train_documents)
    logger.info(
        "toy target corpus: %d train rows (%d tokens), %d held-out rows (%d tokens), tokenizer vocab %d",
        len(corpus.train),
        train_token_count,
        len(corpus.heldout),
        len(heldout_tokens),
        len(tokenizer),
    )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    batches = packed_batches(train_documents, cfg.seq_len, cfg.batch_size, cfg.seed)
    with bulk_compute_threads():
        train_stats = pretrain(model, batches, cfg)
    heldout = evaluate_heldout(model, heldout_tokens, cfg.seq_len, cfg.batch_size)
    logger.info(
        "toy target held-out: loss=%.3f ppl=%.1f top1=%.3f over %d tokens",
        heldout.loss,
        heldout.perplexity,
        heldout.top1_accuracy,
        heldout.tokens,
    )

    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return {
        "format_version": FORMAT_VERSION,
        "settings": cfg.model_dump(mode="json"),
        "corpus_sha256": corpus_sha256(rows),
        "corpus_rows": len(rows),
        "dropped_rows": corpus.dropped,
        "train_rows": len(corpus.train),
        "heldout_rows": len(corpus.heldout),
        "train_tokens": train_token_count,
        "tokenizer_vocab_size": len(tokenizer),
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "steps": train_stats.steps,
        "train_seconds": round(train_stats.seconds, 3),
        "tokens_per_second": round(train_stats.tokens_per_second, 1),
        "final_train_loss": round(train_stats.final_loss, 4),
        "heldout_tokens": heldout.tokens,
        "heldout_loss": round(heldout.loss, 4),
        "heldout_perplexity": round(heldout.perplexity, 3),
        "heldout_top1_accuracy": round(heldout.top1_accuracy, 4),
        "heldout_mean_max_prob": round(heldout.mean_max_prob, 4),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "deepspec_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _is_built(target_dir: Path) -> bool:
    if not target_dir.exists():
        return False
    if not (target_dir / METADATA_NAME).is_file():
        raise RuntimeError(
            f"toy target directory {target_dir} exists but has no {METADATA_NAME}; "
            "it was not written by this package, so delete it and run again"
        )
    return True


def ensure_toy_target(
    cfg: ToyTargetConfig, corpus_rows: Sequence[Sequence[str]], cache_root: Path | None = None
) -> Path:
    """Return the directory of the toy target for ``cfg`` and the corpus, building it if needed.

    The build happens in a temporary sibling directory that is renamed into place
    when complete. An exclusive ``fcntl`` lock per key makes concurrent callers
    (for example two torchrun ranks) wait for one build and then reuse it.
    """
    check_toy_config(cfg)
    key = toy_target_key(cfg, corpus_sha256(corpus_rows))
    parent = (cache_root if cache_root is not None else toy_cache_root()) / "toy-target"
    target_dir = parent / key
    if _is_built(target_dir):
        return target_dir

    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building toy target %s", target_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_built(target_dir):
                return target_dir
            _remove_unfinished_builds(parent, key)
            _build_into(cfg, corpus_rows, parent, key, target_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target_dir


def _remove_unfinished_builds(parent: Path, key: str) -> None:
    """Delete temporary directories left by an interrupted build of ``key`` (the caller holds the lock)."""
    for leftover in parent.glob(f".{key}.tmp-*"):
        logger.info("removing unfinished toy target build %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _build_into(cfg: ToyTargetConfig, rows: Sequence[Sequence[str]], parent: Path, key: str, target_dir: Path) -> None:
    logger.info("building toy target %s (%d pretraining steps)", target_dir, cfg.pretrain_steps)
    temporary = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}.tmp-"))
    try:
        # mkdtemp creates the directory private (0700); the cache may be shared.
        os.chmod(temporary, 0o755)
        metadata = _build_toy_target(cfg, rows, temporary)
        metadata["key"] = key
        (temporary / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        os.rename(temporary, target_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    fsync_dir(parent)
    logger.info(
        "toy target ready: %s (held-out ppl %.1f, %d steps, %.0f tok/s, %.0f s)",
        target_dir,
        metadata["heldout_perplexity"],
        metadata["steps"],
        metadata["tokens_per_second"],
        metadata["wall_seconds"],
    )
