"""Text <-> token ids for Llama checkpoints: one interface, three backends.

    Llama 3   Meta's tiktoken `tokenizer.model`      -> TiktokenTokenizer       (Meta's ChatFormat)
    Llama 2   SentencePiece `tokenizer.model`        -> SentencePieceTokenizer  ([INST] / <<SYS>> format)
    others    `tokenizer.json` (SmolLM2, TinyLlama)  -> HFTokenizer             (checkpoint's chat_template)

`load_tokenizer(folder)` picks the backend from the files present, in this order:
  1. a `tokenizer.model` in Meta's own format, at the folder root or in `original/` (the hub's meta-llama
     layout): a tiktoken file (Llama 3), or a SentencePiece model with a `params.json` beside it (Meta's own
     Llama 2 download). Meta's reference tokenizer and chat format are the ones these models were tuned on.
  2. `tokenizer.json`: the format a HF-style checkpoint is actually shipped and chat-tuned with (TinyLlama,
     for one, ships a SentencePiece `tokenizer.model` too, but its chat template is not Llama 2's).
  3. any other SentencePiece `tokenizer.model` (a Llama 2 folder without `tokenizer.json`).
A `tokenizer.model` is told apart by content, not name: tiktoken's is text lines "base64 rank", while
SentencePiece's is a binary protobuf.

Contracts shared by every backend:
  - Special-token strings typed by a user are plain text: `encode("<|eot_id|>")` gives ordinary text
    tokens, never 128009. Only the chat formats insert control tokens.
  - `eos_ids` lists every id that ends generation; `eos_ids[0]` is the one `encode(..., eos=True)` appends.
  - `encode_chat` never doubles BOS: Llama 3 and chat templates give exactly one at the start (if the
    checkpoint uses BOS at all); Llama 2's format, like Meta's, opens every (user, assistant) turn with a BOS.
  - `decode` renders special tokens the way the reference does: tiktoken and tokenizer.json print their
    text ("<|eot_id|>"), SentencePiece prints control tokens as "".
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | ..., "content": str}


class Tokenizer:
    """The interface every backend implements; `encode` adds BOS/EOS around the backend's plain encoding."""

    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    vocab_size: int
    adds_bos: bool = True  # does a raw text prompt start with BOS? (Meta's text_completion: yes)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_plain(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{type(self).__name__} has no BOS token")
            ids = [self.bos_id, *ids]
        if eos:
            if not self.eos_ids:
                raise ValueError(f"{type(self).__name__} has no EOS token")
            ids = [*ids, self.eos_ids[0]]
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Text to ids with no BOS/EOS, special-token strings read as plain text."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.decode)


class StreamDecoder:
    """Turns generated ids into printable text one id at a time.

    A token can hold half a UTF-8 character (byte-level BPE, SentencePiece byte fallback), and SentencePiece
    drops the leading space of whatever sequence it decodes first, so decoding tokens one by one is wrong.
    Instead we decode a short window ids[prefix_offset:] and print what it adds to the already printed
    ids[prefix_offset:read_offset]. The window starts at least one token before the unprinted ones, so the
    space rule is the same on both sides of the subtraction. Text ending in U+FFFD is an incomplete
    character: hold it back until the next token completes it (the scheme of HF text-generation-inference).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are printed

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        printed = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(printed) or text.endswith("\ufffd"):
            return ""
        return self._advance(text, printed)

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters included (as U+FFFD, like `decode`)."""
        printed = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        return self._advance(text, printed)

    def _advance(self, text: str, printed: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(printed) :]


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be read as what it claims to be."""


# ------------------------------------------------------------------------------------------------------------
# Llama 3: Meta's tiktoken BPE


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer and ChatFormat, as in llama-models' `llama_models/llama3/tokenizer.py`."""

    # Meta's split pattern: contractions, words, numbers in runs of at most 3 digits, punctuation, whitespace
    pat_str = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    num_reserved_special_tokens = 256
    # Named special tokens in id order after the 128000 BPE ranks; the rest of the 256 are reserved
    named_special_tokens = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message: the model called a tool and waits for its output
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
        "<|image|>",
    )
    # tiktoken panics on very long inputs, so Meta cuts the text first; we cut at the same places so the ids
    # stay equal to Meta's even for text past these lengths
    max_encode_chars = 400_000
    max_same_class_chars = 25_000  # longest run of all-whitespace or all-non-whitespace characters

    def __init__(self, model_path: str | Path):
        import tiktoken

        self.path = Path(model_path)
        mergeable_ranks = _read_tiktoken_ranks(self.path)
        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(self.num_reserved_special_tokens - len(self.named_special_tokens))
        ]
        names = [*self.named_special_tokens, *reserved]
        self.special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = len(mergeable_ranks) + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_ids = [self.special_tokens[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(text), self.max_encode_chars):
            window = text[start : start + self.max_encode_chars]
            for chunk in _split_long_runs(window, self.max_same_class_chars):
                # allowed_special=set(), disallowed_special=(): special-token strings are encoded as text
                ids.extend(self.model.encode(chunk, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids])  # invalid UTF-8 becomes U+FFFD

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """<|begin_of_text|>, per message <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>.

        Content is stripped as in Meta's llama3 reference `ChatFormat` (and the HF chat template's `| trim`).
        """
        ids = [self.bos_id]
        for message in messages:
            ids += self._encode_header(message["role"])
            ids += self._encode_plain(message["content"].strip())
            ids.append(self.special_tokens["<|eot_id|>"])
        if add_generation_prompt:
            ids += self._encode_header("assistant")
        return ids

    def _encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role  # Meta's name for the tool-output role
        return [
            self.special_tokens["<|start_header_id|>"],
            *self._encode_plain(role),
            self.special_tokens["<|end_header_id|>"],
            *self._encode_plain("\n\n"),
        ]


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one "base64(token bytes) rank" per line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
        for line in lines:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError) as error:  # UnicodeDecodeError and binascii.Error are ValueErrors
        raise TokenizerFileError(f"{path}: not a readable tiktoken BPE file ({error})") from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _split_long_runs(text: str, max_run: int) -> list[str]:
    """Cut `text` so no piece has more than `max_run` consecutive whitespace or non-whitespace characters."""
    pieces, piece_start, run_length = [], 0, 0
    run_is_space = text[0].isspace() if text else False
    for i, char in enumerate(text):
        if char.isspace() != run_is_space:
            run_is_space, run_length = char.isspace(), 1
        else:
            run_length += 1
            if run_length > max_run:
                pieces.append(text[piece_start:i])
                piece_start, run_length = i, 1
    pieces.append(text[piece_start:])
    return pieces


# ------------------------------------------------------------------------------------------------------------
# Llama 2: SentencePiece BPE


class SentencePieceTokenizer(Tokenizer):
    """Meta's Llama 2 tokenizer (`llama/tokenizer.py`) and the [INST] format of its `chat_completion`."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, model_path: str | Path):
        import sentencepiece

        self.path = Path(model_path)
        try:
            self.model = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerFileError(f"{self.path}: not a readable SentencePiece model ({error})") from error
        self.vocab_size = self.model.vocab_size()
        # SentencePiece reports a disabled token as -1
        self.bos_id = self.model.bos_id() if self.model.bos_id() >= 0 else None
        self.eos_ids = [self.model.eos_id()] if self.model.eos_id() >= 0 else []
        self.pad_id = self.model.pad_id() if self.model.pad_id() >= 0 else None

    def _encode_plain(self, text: str) -> list[int]:
        # SentencePiece never matches control symbols in input text, so "<s>" typed by a user stays text
        return self.model.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids])

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Meta's Llama 2 dialog encoding; each turn is its own BOS ... EOS sequence.

        The system prompt is folded into the first user message. Every (user, assistant) pair becomes
        BOS "[INST] {user} [/INST] {answer} " EOS, and a final user message BOS "[INST] {user} [/INST]".
        This format has no separate generation prompt: "[/INST]" is it, so `add_generation_prompt` changes
        nothing; a dialog that ends with an assistant message encodes its pairs only.
        """
        if not messages or messages[0]["role"] == "system" and len(messages) < 2:
            raise ValueError("Llama 2 chat needs a user message")
        if messages[0]["role"] == "system":
            first_user = self.B_SYS + messages[0]["content"] + self.E_SYS + messages[1]["content"]
            messages = [{"role": messages[1]["role"], "content": first_user}, *messages[2:]]
        roles = [message["role"] for message in messages]
        if roles[0::2] != ["user"] * len(roles[0::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise ValueError(f"Llama 2 chat needs roles (system,) user, assistant, user, ...; got {roles}")
        ids: list[int] = []
        for user, answer in zip(messages[0::2], messages[1::2]):
            turn = f"{self.B_INST} {user['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            ids += self.encode(turn, bos=True, eos=True)
        if len(messages) % 2 == 1:
            ids += self.encode(f"{self.B_INST} {messages[-1]['content'].strip()} {self.E_INST}", bos=True)
        return ids


# ------------------------------------------------------------------------------------------------------------
# tokenizer.json (HF tokenizers) with the checkpoint's jinja chat template

# Private-use characters that wrap special tokens typed in messages, so that after the template is rendered
# we can tell them from the control tokens the template wrote (the scheme of transformers'
# `apply_chat_template(..., sanitize_control_tokens=True)`)
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"

# End-of-turn markers of common chat formats: they end generation even where a checkpoint names only its
# pretraining end-of-text token as eos_token
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>")


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` (package tokenizers) with tokenizer_config.json's tokens and chat template.

    Plain `encode` runs with `encode_special_tokens=True`, the switch behind transformers'
    `split_special_tokens=True`: added tokens marked special are not matched in the text, so a typed
    "<|im_start|>" is plain text (non-special added tokens are ordinary vocabulary and still match).
    """

    def __init__(
        self,
        tokenizer_json: str | Path,
        config: dict | None = None,
        chat_template: str | None = None,
        generation_config: dict | None = None,
    ):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(tokenizer_json)
        try:
            self.model = RustTokenizer.from_file(str(self.path))  # control tokens recognised: for templates
            self.plain_model = RustTokenizer.from_file(str(self.path))  # special-token strings are text
        except Exception as error:  # tokenizers raises a bare Exception for bad JSON or schema
            raise TokenizerFileError(f"{self.path}: not a readable tokenizer.json ({error})") from error
        self.plain_model.encode_special_tokens = True
        config, generation_config = config or {}, generation_config or {}
        self.chat_template = chat_template

        added = self.model.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_token_strings = [token.content for token in added.values() if token.special]
        # Longest first, so a token wins over the tokens it contains; "(?!)" never matches
        longest_first = sorted(self.special_token_strings, key=len, reverse=True)
        self.special_token_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)
        # The template sees these as bos_token, eos_token, ... like transformers' special_tokens_map
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        named = {key: _token_content(config.get(key)) for key in names}
        self.named_tokens = {key: content for key, content in named.items() if content is not None}
        self.bos_id = self._token_id(self.named_tokens.get("bos_token"))
        self.pad_id = self._token_id(self.named_tokens.get("pad_token"))
        # generation_config.json may list several stop ids (Llama 3.x Instruct: 128001, 128008, 128009)
        generation_eos = generation_config.get("eos_token_id", [])
        eos_ids = [self._token_id(self.named_tokens.get("eos_token"))]
        eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        eos_ids += [self.model.token_to_id(name) for name in _END_OF_TURN_TOKENS]  # None when absent
        self.eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))  # dedupe, keep order

        # Does this checkpoint start every sequence with BOS? tokenizer_config's add_bos_token says so (as in
        # transformers); without it, the tokenizer.json post-processor decides.
        if "add_bos_token" in config:
            self.adds_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        else:
            self.adds_bos = self.bos_id is not None and self.model.encode("a").ids[:1] == [self.bos_id]

    def _token_id(self, content: str | None) -> int | None:
        if content is None:
            return None
        token_id = self.model.token_to_id(content)
        if token_id is None:
            raise TokenizerFileError(f"{self.path}: tokenizer_config's {content!r} is not in the vocab")
        return token_id

    def _encode_plain(self, text: str) -> list[int]:
        return self.plain_model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Render the checkpoint's chat template as transformers does, then encode it.

        The control tokens the template writes are encoded as tokens; special tokens typed in a message are
        encoded as text (as transformers' `sanitize_control_tokens=True`). The ids start with one BOS if the
        checkpoint uses BOS, whether or not the template wrote it.
        """
        if self.chat_template is None:
            where = "tokenizer_config.json or chat_template.jinja"
            raise ValueError(f"{self.path.parent}: no chat_template in {where}")
        marked = [{key: self._mark(value) for key, value in message.items()} for message in messages]
        text = render_chat_template(self.chat_template, marked, add_generation_prompt, **self.named_tokens)
        ids = self._encode_marked(text)
        if self.adds_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def _mark(self, value: object) -> object:
        """Wrap each special-token string in a message value between the private-use markers."""
        if not isinstance(value, str):
            return value
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")  # so a user cannot forge a marker
        return self.special_token_re.sub(lambda match: _MARK_START + match.group(0) + _MARK_END, value)

    def _encode_marked(self, text: str) -> list[int]:
        """Encode rendered text in pieces: marked (typed) special tokens as text, the rest as usual.

        re.split with one group gives [text, marked token, text, ...]; a lone marker (the template cut a
        marked token in two) gives None there and is dropped, but still cuts the text so no token spans it.
        """
        marked_re = f"{_MARK_START}({self.special_token_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
        pieces = re.split(marked_re, text)
        ids = self.model.encode(pieces[0], add_special_tokens=False).ids
        newline_ids = self.model.encode("\n", add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            model = self.plain_model if i % 2 == 1 else self.model
            # A piece from mid-text: encode it after a newline and drop that, so a SentencePiece-style
            # tokenizer does not prepend the space it adds at the start of a text (as transformers does)
            piece_ids = model.encode("\n" + piece, add_special_tokens=False).ids
            if piece_ids[: len(newline_ids)] == newline_ids:
                piece_ids = piece_ids[len(newline_ids) :]
            else:
                piece_ids = model.encode(piece, add_special_tokens=False).ids
            ids += piece_ids
        return ids


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes a token as a string or as a serialized AddedToken {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def render_chat_template(
    template: str, messages: list[Message], add_generation_prompt: bool, **special_tokens: str
) -> str:
    """Render a HF chat template in the environment transformers uses, so the text is the same."""
    return _compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
    )


@functools.lru_cache
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps
        options = dict(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        return json.dumps(value, **options)

    # A template is code from the checkpoint: the sandbox keeps it from reaching Python internals
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.1 dates its prompt
    return env.from_string(template)


# ------------------------------------------------------------------------------------------------------------
# Picking a backend


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder, or None if it has no tokenizer files (rule: module docstring)."""
    folder = Path(folder)
    for meta_folder in (folder, folder / "original"):
        model_path = meta_folder / "tokenizer.model"
        if model_path.is_file():
            if _is_tiktoken_file(model_path):
                return TiktokenTokenizer(model_path)
            if (meta_folder / "params.json").is_file():
                return SentencePieceTokenizer(model_path)
    if (folder / "tokenizer.json").is_file():
        return _load_hf_tokenizer(folder)
    for model_path in (folder / "tokenizer.model", folder / "original" / "tokenizer.model"):
        if model_path.is_file():
            return SentencePieceTokenizer(model_path)
    return None


def _is_tiktoken_file(path: Path) -> bool:
    """tiktoken files start with a text line "base64 rank"; a SentencePiece protobuf starts with binary."""
    try:
        with open(path, "rb") as file:
            first_line = file.readline(1024)
    except OSError as error:
        raise TokenizerFileError(f"{path}: cannot read ({error})") from error
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?", first_line) is not None


def _load_hf_tokenizer(folder: Path) -> HFTokenizer:
    config = _read_json(folder / "tokenizer_config.json")
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        chat_template = {entry["name"]: entry["template"] for entry in chat_template}.get("default")
    jinja_file = folder / "chat_template.jinja"  # newer transformers saves the template beside the config
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")
    generation_config = _read_json(folder / "generation_config.json")
    return HFTokenizer(folder / "tokenizer.json", config, chat_template, generation_config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"{path}: not readable JSON ({error})") from error
