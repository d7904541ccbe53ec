"""Turns `learn` input (the SEED_API data forms) into token ids with loss masks, validating first.

Forms: a conversation (list of {"role", "content"}) or a list of them, {"messages": [...]};
{"prompt", "response"|"completion"} or a list of them; plain strings (loss on every token).
Conversations use the tokenizer's chat template, loss on assistant turns only; prompt/response pairs
are the prompt's ids (as `generate` encodes it) + the response's ids + eos, loss on response + eos.
Knows nothing about models, adapters or training.
"""
from __future__ import annotations

from dataclasses import dataclass

from serve.engine.errors import InvalidRequestError, PromptTooLongError

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # IGNORE where no loss


def _is_conversation(item) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m for m in item)


def _items(data) -> list:
    """Split the top level into single examples."""
    if isinstance(data, (str, dict)) or _is_conversation(data):
        return [data]
    if isinstance(data, (list, tuple)):
        if not data:
            raise InvalidRequestError("learn data is empty")
        return list(data)
    raise InvalidRequestError(f"learn data must be a string, dict or list, got {type(data).__name__}")


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError("a conversation must be a non-empty list of {'role', 'content'} dicts")
    for message in messages:
        if set(message) - {"role", "content", "name"} or "role" not in message:
            raise InvalidRequestError(f"message has unexpected keys {sorted(message)}")
        if message["role"] not in ROLES:
            raise InvalidRequestError(f"unknown role {str(message['role'])[:40]!r}; use one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError("message content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRequestError("a conversation needs at least one assistant turn to learn from")
    return messages


def _conversation(tokenizer, messages: list[dict]) -> Example:
    """Loss on each assistant turn's content and its end-of-turn tokens (located by char offsets)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                                      add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False))
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(s <= lo < e for s, e in spans) else IGNORE
              for tok, (lo, _hi) in zip(enc["input_ids"], enc["offset_mapping"])]
    return Example(list(enc["input_ids"]), labels)


def _pair(tokenizer, item: dict, eos_id: int) -> Example:
    keys = set(item)
    answer_key = "response" if "response" in keys else "completion"
    if keys != {"prompt", answer_key}:
        raise InvalidRequestError("a dict example needs exactly 'prompt' and 'response' (or 'completion'), "
                                  f"got keys {sorted(keys)}")
    prompt, answer = item["prompt"], item[answer_key]
    if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
        raise InvalidRequestError("'prompt' must be a string and the response a non-empty string")
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_id]
    return Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def _plain(tokenizer, text: str) -> Example:
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise InvalidRequestError("a plain-text example needs at least two tokens")
    return Example(ids, list(ids))


def _one(tokenizer, item, eos_id: int) -> Example:
    if isinstance(item, str):
        return _plain(tokenizer, item)
    if isinstance(item, dict) and set(item) == {"messages"}:
        return _conversation(tokenizer, _check_messages(item["messages"]))
    if isinstance(item, dict):
        return _pair(tokenizer, item, eos_id)
    if isinstance(item, list) and item:
        return _conversation(tokenizer, _check_messages(item))
    raise InvalidRequestError(f"unsupported learn example of type {type(item).__name__}")


def build_examples(tokenizer, data, *, eos_id: int, max_len: int, max_examples: int = 10_000) -> list[Example]:
    """Validate and tokenize every example; raises InvalidRequestError before any training."""
    items = _items(data)
    if len(items) > max_examples:
        raise InvalidRequestError(f"at most {max_examples} examples per learn call, got {len(items)}")
    examples = [_one(tokenizer, item, eos_id) for item in items]
    for number, example in enumerate(examples):
        if len(example.input_ids) > max_len:
            raise PromptTooLongError(f"example {number} has {len(example.input_ids)} tokens; "
                                     f"the model's context is {max_len}")
        if all(label == IGNORE for label in example.labels[1:]):
            raise InvalidRequestError(f"example {number} has no tokens to learn from")
    return examples
