"""What preprocessing did: counts, drops by reason (with the first locations), boundary fallbacks, tokens,
histogram."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .errors import REASON_NAMES, RESPONSE_TRUNCATED

MAX_EXAMPLES_PER_REASON = 5


@dataclass
class PreprocessReport:
    """Counters of one preprocessing run; `format()` is the printed report, `to_dict()` goes to meta.json."""
    source: str = ""
    kind: str = ""
    records_read: int = 0
    records_written: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)
    drop_examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> ["file:line: message"]
    truncated: int = 0
    truncated_examples: List[str] = field(default_factory=list)
    # kept records whose prompt and response were tokenised separately (data.prompt_boundary=fallback)
    boundary_fallbacks: int = 0
    boundary_fallback_examples: List[str] = field(default_factory=list)
    num_sequences: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    max_sequence_len: int = 0
    length_histogram: Dict[str, int] = field(default_factory=dict)  # "lo-hi" -> sequences
    padding_fraction_unpacked: Optional[float] = None
    padding_fraction_packed: Optional[float] = None
    padding_micro_batch_size: int = 0
    max_seq_len: int = 0
    seconds: float = 0.0

    def drop(self, reason: str, where: str, message: str) -> None:
        """Count one dropped record."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.drop_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(f"{where}: {message}")

    def truncate(self, where: str, message: str) -> None:
        """Count one kept record whose response was cut to fit."""
        self.truncated += 1
        if len(self.truncated_examples) < MAX_EXAMPLES_PER_REASON:
            self.truncated_examples.append(f"{where}: {message}")

    def fall_back(self, where: str, message: str) -> None:
        """Count one kept record tokenised segment by segment (its prompt tokens were not a token prefix)."""
        self.boundary_fallbacks += 1
        if len(self.boundary_fallback_examples) < MAX_EXAMPLES_PER_REASON:
            self.boundary_fallback_examples.append(f"{where}: {message}")

    def add_sequence(self, length: int, prompt_len: int) -> None:
        """Count one written sequence of `length` tokens, `prompt_len` of them prompt."""
        self.num_sequences += 1
        self.prompt_tokens += prompt_len
        self.response_tokens += length - prompt_len
        self.max_sequence_len = max(self.max_sequence_len, length)
        lo = 1
        while lo * 2 <= length:  # power-of-two buckets [lo, 2*lo)
            lo *= 2
        key = f"{lo}-{2 * lo - 1}"
        self.length_histogram[key] = self.length_histogram.get(key, 0) + 1

    @property
    def total_dropped(self) -> int:
        """Records dropped for any reason."""
        return sum(self.dropped.values())

    def to_dict(self) -> Dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    def format(self) -> str:
        """The human-readable report."""
        tokens = self.prompt_tokens + self.response_tokens
        lines = [f"preprocess report: {self.source} (kind {self.kind}, {self.seconds:.1f}s)",
                 f"  records read       {self.records_read}",
                 f"  records written    {self.records_written}",
                 f"  records dropped    {self.total_dropped}"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {REASON_NAMES.get(reason, reason):<34} {count}")
            lines.extend(f"      e.g. {e}" for e in self.drop_examples.get(reason, []))
        lines.append(f"  {REASON_NAMES[RESPONSE_TRUNCATED]:<18} {self.truncated} (kept, cut to fit)")
        lines.extend(f"      e.g. {e}" for e in self.truncated_examples)
        if self.boundary_fallbacks:
            lines.append(f"  prompt/response tokenised separately {self.boundary_fallbacks} (kept; the prompt's tokens "
                         "were not a prefix of the whole text's: data.prompt_boundary=fallback)")
            lines.extend(f"      e.g. {e}" for e in self.boundary_fallback_examples)
        mean = tokens / self.num_sequences if self.num_sequences else 0.0
        lines.append(f"  sequences {self.num_sequences}, tokens {tokens} (prompt {self.prompt_tokens}, "
                     f"response {self.response_tokens}), mean {mean:.1f}, max {self.max_sequence_len}")
        if self.length_histogram:
            lines.append("  sequence length histogram (tokens: sequences)")
            peak = max(self.length_histogram.values())
            for key in sorted(self.length_histogram, key=lambda k: int(k.split("-")[0])):
                count = self.length_histogram[key]
                bar = "#" * max(1, round(40 * count / peak))
                lines.append(f"    {key:>11}: {count:>8} {bar}")
        if self.padding_fraction_unpacked is not None:
            lines.append(f"  padding fraction (micro-batch {self.padding_micro_batch_size}, max_seq_len "
                         f"{self.max_seq_len}): unpacked {self.padding_fraction_unpacked:.3f}, "
                         f"packed {self.padding_fraction_packed:.3f}")
        return "\n".join(lines)
