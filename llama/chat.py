"""`llama chat`: a conversation that always fits the model's context, typed at a terminal or piped in.

At a terminal: line editing and this session's history (the standard library's readline), lines that arrive
together (a paste) as one message, a block of lines between two lines of three double quotes, and the commands of
HELP. From a pipe: one message per line (blocks and commands work too), and on stdout the answers only, one per
message; whatever else is said goes to stderr.

Under torchrun, rank 0 reads and every rank runs the same entry, so every rank holds the same conversation.
"""

from __future__ import annotations

import select
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llama import tp
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama.api import Llama

BLOCK = '"""'
HELP = f"""commands:
  /exit, /quit    leave (so do Ctrl-D and the end of piped input)
  /reset          forget the conversation, keep the system message
  /system TEXT    set the system message and start a new conversation (/system alone shows it)
  /help           this list
  //TEXT          send "/TEXT": a message that begins with / starts with //
a line of {BLOCK} opens a block of several lines and another line of {BLOCK} sends it;
lines pasted at once are one message.
Ctrl-C stops an answer (the part shown stays in the conversation) or clears the line being typed.
When the conversation outgrows --max-seq-len, its oldest turns are dropped (never the system message)."""

PASTE_SECONDS = 0.02  # lines that arrive within this of each other were pasted, not typed


class MessageTooLong(ValueError):
    """A message that does not fit in the context even without any earlier turns."""


@dataclass
class ChatSession:
    """The conversation: an optional system message and (question, answer) turns, kept short enough that the
    prompt for the next answer plus max_new_tokens fits in max_seq_len positions."""

    tokenizer: Tokenizer
    max_seq_len: int
    max_new_tokens: int
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, question: str | None = None, first_turn: int = 0) -> list[dict[str, str]]:
        """The chat messages from turn `first_turn` on, then `question` if given."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for asked, answer in self.turns[first_turn:]:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
        if question is not None:
            messages.append({"role": "user", "content": question})
        return messages

    def prompt(self, question: str) -> tuple[list[int], int]:
        """The token ids that ask `question` after the conversation, and how many of the oldest turns were
        dropped, for good, to make them fit. A question that does not fit even alone raises MessageTooLong and
        changes nothing."""
        room = self.max_seq_len - self.max_new_tokens
        for dropped in range(len(self.turns) + 1):  # dropping a turn never lengthens the prompt
            ids = self.tokenizer.encode_chat(self.messages(question, first_turn=dropped), add_generation_prompt=True)
            if len(ids) <= room:
                del self.turns[:dropped]
                return ids, dropped
        with_system = " with the system message" if self.system else ""
        raise MessageTooLong(f"message not sent: it takes {len(ids)} tokens in the chat format{with_system}, "
                             f"and with max_new_tokens={self.max_new_tokens} that is more than "
                             f"max_seq_len={self.max_seq_len}")


class InputReader:
    """The user's next entry (a message or a command) from stdin."""

    def __init__(self):
        self.terminal = sys.stdin.isatty()
        self.ended = False
        if self.terminal:
            try:
                import readline  # noqa: F401  (from now on input() edits the line and keeps a history)
            except ImportError:  # (Windows has none)
                pass

    def entries(self) -> Iterator[str | None]:
        """Each entry, stripped and never empty, then None at the end of the input (Ctrl-D). Ctrl-C while
        typing drops what was typed and asks again, as a shell does."""
        while not self.ended:
            try:
                entry = self._entry()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if entry:
                yield entry
        yield None

    def _entry(self) -> str:
        line = self._line("> ")
        if line is None:
            return ""
        lines = [line]
        if line.strip() == BLOCK:
            lines = []
            while (line := self._line("... ")) is not None and line.strip() != BLOCK:
                lines.append(line)
        elif self.terminal:
            # Lines already waiting when this one was read came with it: a paste. (Readline hands the terminal
            # back with what it left unread marked readable, so a last line without its newline is taken too.)
            while self._waiting() and (line := self._line("... ")) is not None:
                lines.append(line)
        return "\n".join(lines).strip()

    def _line(self, prompt: str) -> str | None:
        """One line without its newline; None at the end of the input."""
        if self.terminal:
            try:
                if sys.stdout.isatty():
                    return input(prompt)
                print(prompt, end="", file=sys.stderr, flush=True)  # stdout is a file: it gets the answers only
                return input()
            except EOFError:
                self.ended = True
                print(file=sys.stderr)
                return None
        line = sys.stdin.readline()
        self.ended = not line
        return line.removesuffix("\n") if line else None

    @staticmethod
    def _waiting() -> bool:
        return bool(select.select([sys.stdin], [], [], PASTE_SECONDS)[0])


def chat(llm: Llama, options: dict, system: str | None = None, prompt: str | None = None) -> int:
    """Answer `prompt` and return, or else hold a conversation on stdin until it ends; returns the exit code."""
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer files, so it cannot chat")
    session = ChatSession(llm.tokenizer, llm.max_seq_len, options["max_new_tokens"], system)
    if prompt is not None:
        _answer(llm, session, prompt, options)  # a message that cannot fit is an error here
        return 0
    reader = InputReader() if tp.rank() == 0 else None
    entries = reader.entries() if reader else None
    if reader and reader.terminal:
        print("Chatting: /help lists the commands, Ctrl-D leaves.", file=sys.stderr)
    while (entry := tp.broadcast(next(entries) if entries else None)) is not None:
        if entry.startswith("/") and not entry.startswith("//"):
            if not _command(session, entry):
                return 0
            continue
        try:
            _answer(llm, session, entry[1:] if entry.startswith("//") else entry, options)
        except MessageTooLong as e:  # refused; the conversation goes on without it
            print(f"llama: {e}", file=sys.stderr)
    return 0


def _command(session: ChatSession, entry: str) -> bool:
    """Run one /command; False means leave."""
    name, *argument = entry.split(maxsplit=1)
    argument = argument[0] if argument else ""
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.turns.clear()
        print("(a new conversation)", file=sys.stderr)
    elif name == "/system" and argument:
        # The earlier answers followed other instructions: the new system message starts a new conversation.
        session.system = argument
        session.turns.clear()
        print("(system message set; a new conversation)", file=sys.stderr)
    elif name == "/system":
        print(f"system message: {session.system!r}" if session.system else "(no system message)", file=sys.stderr)
    elif name == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"llama: unknown command {name}: /help lists the commands; // sends a message that begins with /",
              file=sys.stderr)
    return True


def _answer(llm: Llama, session: ChatSession, question: str, options: dict) -> None:
    """Stream the answer to stdout and add the turn to the conversation; Ctrl-C stops it, keeping what was shown."""
    ids, dropped = session.prompt(question)
    if dropped:
        print(f"llama: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} of the conversation to fit "
              f"max_seq_len={session.max_seq_len}", file=sys.stderr)
    shown = []
    pieces = llm.stream(ids, **options)
    try:
        for piece in pieces:
            shown.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        pieces.close()  # the stats count the tokens now, not whenever the generator is collected
    print(flush=True)
    print(llm.stats.summary(), file=sys.stderr)
    session.turns.append((question, "".join(shown)))
