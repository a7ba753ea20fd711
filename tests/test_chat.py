"""`llama chat`: the conversation that fits the context, piped input, commands, and the terminal (a pseudo-terminal).

Answers are greedy (--temperature 0) and short; the reference for each one is `Llama.generate` of the chat prompt
the conversation should have reached, built here from the messages by the tokenizer."""

from __future__ import annotations

import codecs
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

import llama
from llama.chat import ChatSession, MessageTooLong
from llama.tokenizer import load_tokenizer

NEW_TOKENS = 8
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TERM="xterm")


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def reference_answer(llm, messages: list[dict[str, str]], max_new_tokens: int = NEW_TOKENS) -> str:
    return llm.generate(llm.tokenizer.encode_chat(messages), max_new_tokens=max_new_tokens)[0].text


def chat_command(smollm2_dir, *args: str) -> list[str]:
    # (--no-compile: the references are the eager model's answers, and each run starts in seconds)
    return [sys.executable, "-m", "llama", "chat", "--model", str(smollm2_dir), "--device", "cpu", "--no-compile",
            "--temperature", "0", *args]


def answers_in(stderr: str) -> int:
    return stderr.count("decode: ")  # one stats line per answer


# ---------------------------------------------------------------------------- fitting the history (no model)
SYSTEM = "You are a terse assistant."
TURNS = [(f"Tell me fact number {i} about the sea.", f"Fact {i}: the sea is deep and salty, and it has waves.")
         for i in range(5)]
QUESTION = "And one about rivers?"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def prompt_length(tokenizer, first_turn: int) -> int:
    """Tokens of the chat prompt with the system message, TURNS[first_turn:] and QUESTION, by the tokenizer."""
    messages = [{"role": "system", "content": SYSTEM}]
    for asked, answer in TURNS[first_turn:]:
        messages += [user(asked), assistant(answer)]
    return len(tokenizer.encode_chat([*messages, user(QUESTION)], add_generation_prompt=True))


def test_a_conversation_that_fits_is_sent_whole(tokenizer):
    session = ChatSession(tokenizer, prompt_length(tokenizer, 0) + 16, 16, SYSTEM, list(TURNS))
    ids, dropped = session.prompt(QUESTION)
    assert dropped == 0 and session.turns == TURNS and len(ids) == prompt_length(tokenizer, 0)


@pytest.mark.parametrize("kept", range(len(TURNS)))
def test_the_oldest_turns_go_first_and_the_system_message_stays(tokenizer, kept):
    first_turn = len(TURNS) - kept
    session = ChatSession(tokenizer, prompt_length(tokenizer, first_turn) + 16, 16, SYSTEM, list(TURNS))
    ids, dropped = session.prompt(QUESTION)
    assert dropped == first_turn and session.turns == TURNS[first_turn:]
    assert tokenizer.decode(ids).count(SYSTEM) == 1


@pytest.mark.parametrize("spare", [0, 1, 7])
def test_the_fitted_prompt_and_max_new_tokens_stay_within_max_seq_len(tokenizer, spare):
    max_seq_len = prompt_length(tokenizer, 2) + 16 + spare  # three turns fit, four do not
    ids, _ = ChatSession(tokenizer, max_seq_len, 16, SYSTEM, list(TURNS)).prompt(QUESTION)
    assert len(ids) == prompt_length(tokenizer, 2) and len(ids) + 16 <= max_seq_len


def test_a_message_too_long_even_alone_is_refused_and_the_history_kept(tokenizer):
    session = ChatSession(tokenizer, prompt_length(tokenizer, len(TURNS)) + 15, 16, SYSTEM, list(TURNS))
    with pytest.raises(MessageTooLong, match=f"takes {prompt_length(tokenizer, len(TURNS))} tokens"):
        session.prompt(QUESTION)
    assert session.turns == TURNS


# ---------------------------------------------------------------------------- statistics of a stopped stream
def test_closing_a_stream_early_counts_the_tokens_it_yielded(llm):
    prompt = llm.tokenizer.encode_chat([user("Write a story about a dragon.")])
    pieces = llm.stream(prompt, max_new_tokens=40)
    shown = [next(pieces) for _ in range(5)]
    pieces.close()
    stats = llm.stats
    # The first 5 tokens alone decode to the 5 pieces: each piece was one token
    assert llm.generate(prompt, max_new_tokens=5)[0].text == "".join(shown)
    assert stats.new_tokens == 5 and stats.decode_seconds > 0


def test_the_decode_rate_counts_every_step_decoded_in_every_row(llm):
    """A batch of 2 rows, 6 new tokens each with end-of-sequence ignored: 5 decode steps after the prefill's token,
    each producing a token per row, so the rate is 2 * 5 / decode_seconds."""
    eos, llm.eos_token_ids = llm.eos_token_ids, []
    try:
        llm.generate(["Hello", "The sea is"], max_new_tokens=6)
    finally:
        llm.eos_token_ids = eos
    stats = llm.stats
    assert (stats.new_tokens, stats.decode_steps, stats.rows) == (12, 5, 2)
    assert f"({2 * 5 / stats.decode_seconds:.1f} tok/s)" in stats.summary()


# ---------------------------------------------------------------------------- piped stdin
PIPED = ["Hi, my name is Ana.", "/help", "/nonsense", "What is my name?", "/reset", "What is my name?",
         "//help me", "/system Answer in French.", "Hello", "/exit", "Never answered."]


@pytest.fixture(scope="module")
def piped(smollm2_dir):
    return subprocess.run(chat_command(smollm2_dir, "--max-new-tokens", str(NEW_TOKENS)), input="\n".join(PIPED),
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def piped_answers(llm) -> dict[str, str]:
    """What each answer of the PIPED session should be, and what it would be had a command been ignored."""
    first = reference_answer(llm, [user(PIPED[0])])
    remembered = reference_answer(llm, [user(PIPED[0]), assistant(first), user(PIPED[3])])
    after_reset = reference_answer(llm, [user(PIPED[5])])
    slash = reference_answer(llm, [user(PIPED[5]), assistant(after_reset), user("/help me")])
    with_system = reference_answer(llm, [{"role": "system", "content": "Answer in French."}, user("Hello")])
    no_reset = reference_answer(llm, [user(PIPED[0]), assistant(first), user(PIPED[3]), assistant(remembered),
                                      user(PIPED[5])])
    no_system = reference_answer(llm, [user(PIPED[5]), assistant(after_reset), user("/help me"), assistant(slash),
                                       user("Hello")])
    return dict(first=first, remembered=remembered, after_reset=after_reset, slash=slash, with_system=with_system,
                no_reset=no_reset, no_system=no_system)


def test_piped_chat_prints_only_the_answers_on_stdout(piped, piped_answers):
    assert piped.returncode == 0, piped.stderr
    answers = [piped_answers[key] for key in ("first", "remembered", "after_reset", "slash", "with_system")]
    assert piped.stdout == "".join(answer + "\n" for answer in answers)


def test_piped_chat_answers_with_the_history(piped, piped_answers):
    assert piped.stdout.startswith(piped_answers["first"] + "\n" + piped_answers["remembered"] + "\n")


def test_reset_forgets_the_conversation(piped, piped_answers):
    assert piped_answers["after_reset"] != piped_answers["no_reset"]  # (else this test could not tell)
    assert "\n" + piped_answers["after_reset"] + "\n" in piped.stdout


def test_system_sets_the_system_message_and_starts_a_new_conversation(piped, piped_answers):
    assert piped_answers["with_system"] != piped_answers["no_system"]
    assert piped.stdout.endswith("\n" + piped_answers["with_system"] + "\n")


def test_double_slash_sends_a_message_that_begins_with_slash(piped, piped_answers):
    assert "\n" + piped_answers["slash"] + "\n" in piped.stdout


def test_help_lists_the_commands_on_stderr(piped):
    assert all(command in piped.stderr for command in ("/exit", "/reset", "/system TEXT", "/help", '"""'))


def test_unknown_command_gets_a_one_line_hint_and_no_answer(piped):
    hints = [line for line in piped.stderr.splitlines() if "/nonsense" in line]
    assert hints == ["llama: unknown command /nonsense: /help lists the commands; // sends a message that begins "
                     "with /"]
    assert answers_in(piped.stderr) == 5


def test_exit_leaves_before_the_lines_after_it(piped):
    assert piped.returncode == 0 and answers_in(piped.stderr) == 5  # "Never answered." was not


# Each question takes ~50 of the 200 positions, so the fourth needs turns dropped; one message is too long alone
LONG_CHAT = [f"Say one word about {thing}: " + "please " * 40 for thing in ("cats", "dogs", "birds")] + \
            ["word " * 300] + [f"Say one word about {thing}: " + "please " * 40 for thing in ("fish", "frogs")]


@pytest.fixture(scope="module")
def long_chat(smollm2_dir):
    return subprocess.run(chat_command(smollm2_dir, "--max-new-tokens", str(NEW_TOKENS), "--max-seq-len", "200"),
                          input="\n".join(LONG_CHAT), capture_output=True, text=True, env=ENV, timeout=300)


def test_a_chat_longer_than_max_seq_len_drops_old_turns_and_goes_on(long_chat):
    assert long_chat.returncode == 0, long_chat.stderr
    assert re.search(r"^llama: dropped the \d+ oldest turns? of the conversation to fit max_seq_len=200$",
                     long_chat.stderr, re.MULTILINE)
    assert answers_in(long_chat.stderr) == len(LONG_CHAT) - 1


def test_a_message_that_cannot_fit_is_refused_and_the_chat_goes_on(long_chat):
    refusals = [line for line in long_chat.stderr.splitlines() if "message not sent" in line]
    assert len(refusals) == 1 and "more than max_seq_len=200" in refusals[0]
    assert answers_in(long_chat.stderr) == len(LONG_CHAT) - 1


# ---------------------------------------------------------------------------- at a terminal (pseudo-terminal)
class Terminal:
    """`llama chat` run in a pseudo-terminal: what a user at a keyboard types and sees (newlines shown as \\n)."""

    def __init__(self, command: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child becomes the command, with the pseudo-terminal as its terminal
            try:
                # On Ctrl-C a terminal discards the output not yet read, here text the test must see: keep it
                attributes = termios.tcgetattr(0)
                attributes[3] |= termios.NOFLSH
                termios.tcsetattr(0, termios.TCSANOW, attributes)
                # Ctrl-C at a terminal interrupts: a test run started in the background (`make test &`) has SIGINT
                # ignored, which the command would inherit, and Python then installs no handler for it
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(command[0], command, ENV)
            finally:
                os._exit(127)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.screen = ""  # everything shown so far
        self.read_up_to = 0  # where the next wait_for starts looking

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, text: str, timeout: float = 180) -> str:
        """Read until `text` is shown; return what was shown before it, since the last wait_for."""
        deadline = time.monotonic() + timeout
        while (found := self.screen.find(text, self.read_up_to)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"{text!r} was not shown; the screen since the last wait:\n"
                                     f"{self.screen[self.read_up_to:]}")
        before, self.read_up_to = self.screen[self.read_up_to:found], found + len(text)
        return before

    def wait_for_text(self, characters: int, timeout: float = 180) -> None:
        """Read until `characters` more are shown after the last wait_for."""
        deadline = time.monotonic() + timeout
        while len(self.screen) - self.read_up_to < characters:
            assert self._read(deadline - time.monotonic()), "the program stopped showing text"

    def exit_code(self, timeout: float = 60) -> int:
        """Read to the end (the program must be leaving), then its exit code."""
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # (Linux: the program closed the terminal)
            return False
        self.screen += self.decoder.decode(data).replace("\r\n", "\n")
        return bool(data)


PASTED = "Translate to French:\nGood morning\nThank you"
BLOCK = ["Now to German:", "", "Good night"]


@pytest.fixture(scope="module")
def typed(smollm2_dir) -> dict:
    """A session at a terminal: three lines pasted at once, a block typed line by line between lines of \"\"\", then
    Ctrl-D. What was shown at each point, and the exit code. (Ctrl-C at the prompt, which drops the line typed, is
    not driven here: in one clean CI run of two, the prompt after it never came back to the pseudo-terminal.)"""
    terminal = Terminal(chat_command(smollm2_dir, "--max-new-tokens", str(NEW_TOKENS)))
    try:
        shown = dict(banner=terminal.wait_for("> "))
        terminal.type(PASTED.replace("\n", "\r") + "\r")  # one write, as a terminal sends a paste
        terminal.wait_for("Thank you\n")
        shown["pasted_answer"] = terminal.wait_for("\nprefill: ")
        terminal.wait_for("> ")
        for line in ['"""', *BLOCK]:  # typed: each line once the prompt for it is shown
            terminal.type(line + "\r")
            terminal.wait_for("... ")
        terminal.type('"""\r')
        terminal.wait_for('"""\n')
        shown["block_answer"] = terminal.wait_for("\nprefill: ")
        terminal.wait_for("> ")
        terminal.type("\x04")
        shown["exit_code"] = terminal.exit_code()
        shown["answers"] = answers_in(terminal.screen)
        return shown
    finally:
        terminal.kill()


def test_a_terminal_shows_the_banner_then_the_prompt(typed):
    assert "Chatting: /help lists the commands, Ctrl-D leaves." in typed["banner"]


def test_lines_pasted_at_once_are_one_message(typed, llm):
    assert typed["pasted_answer"] == reference_answer(llm, [user(PASTED)])
    assert typed["answers"] == 2  # the paste's and the block's


def test_a_block_between_triple_quotes_is_one_message(typed, llm):
    pasted_answer = reference_answer(llm, [user(PASTED)])
    expected = reference_answer(llm, [user(PASTED), assistant(pasted_answer), user("\n".join(BLOCK))])
    assert typed["block_answer"] == expected


def test_ctrl_d_at_the_prompt_leaves_with_exit_code_0(typed):
    assert typed["exit_code"] == 0


STOPPED = ["Write a long story about a dragon.", "Now a long poem about the sea."]


@pytest.fixture(scope="module")
def interrupted(smollm2_dir) -> dict:
    """Two long answers, each stopped by Ctrl-C once it has shown some text, then Ctrl-D: for each, the text
    shown and the stats line's decode count."""
    terminal = Terminal(chat_command(smollm2_dir, "--max-new-tokens", "300"))
    try:
        stopped = []
        terminal.wait_for("> ")
        for question in STOPPED:
            terminal.type(question + "\r")
            terminal.wait_for(question + "\n")
            terminal.wait_for_text(40)
            terminal.type("\x03")
            shown = terminal.wait_for("\nprefill: ").replace("^C", "")  # (the terminal's echo of Ctrl-C)
            decoded = int(re.search(r"decode: (\d+) tokens", terminal.wait_for("\n")).group(1))
            stopped.append((shown, decoded))
            terminal.wait_for("> ")
        terminal.type("\x04")
        return dict(stopped=stopped, exit_code=terminal.exit_code())
    finally:
        terminal.kill()


def test_ctrl_c_stops_the_answer_and_the_stats_count_the_tokens_shown(interrupted, llm):
    shown, decoded = interrupted["stopped"][0]
    assert 0 < decoded < 300
    assert reference_answer(llm, [user(STOPPED[0])], max_new_tokens=decoded) == shown


def test_after_ctrl_c_the_chat_goes_on_with_the_part_shown_in_its_history(interrupted, llm):
    (first_shown, _), (shown, decoded) = interrupted["stopped"]
    messages = [user(STOPPED[0]), assistant(first_shown), user(STOPPED[1])]
    assert reference_answer(llm, messages, max_new_tokens=decoded) == shown
    assert interrupted["exit_code"] == 0


def test_without_max_new_tokens_a_short_max_seq_len_still_chats(smollm2_dir):
    """`llama chat --max-seq-len 200` as a user types it: the default answer length (256) would leave no room for
    the conversation, so chat caps it at half the context (100) instead of refusing to start."""
    result = subprocess.run(chat_command(smollm2_dir, "--max-seq-len", "200"), input="What is 2 + 2?\nAnd 3 + 3?\n",
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    decoded = [int(n) for n in re.findall(r"decode: (\d+) tokens", result.stderr)]
    assert len(decoded) == 2 and all(1 <= n <= 100 for n in decoded), result.stderr
