"""Data curation for the frontier loop (generate -> score -> filter -> select -> SFT -> DPO/RPO).

Pure Python over JSONL records (no model, no process group); the floor above `megatron.data`, whose record
reader and bad-record reasons it reuses. One job per module:

  scored.py   the scored-completions contract (tools/generate.py output + `completions[i].score`) and reading
  rules.py    refusal phrases (refusal_phrases.txt), length and score bounds, top fraction per prompt
  dedup.py    exact and near-duplicate detection (word n-gram Jaccard, MinHash LSH candidates)
  filter.py   `filter_files`: the rules in order, counted per rule (tools/filter_data.py)
  select.py   `select_files`: best-of-n SFT records, best-vs-worst / all-pairs preference records (tools/select_data.py)
  report.py   the JSON reports and printed tables
"""
from .filter import DEDUP_SCOPES, FilterResult, FilterSettings, filter_files
from .report import FilterReport, SelectReport
from .rules import SHIPPED_PHRASES, load_phrases
from .select import MODES, all_pairs, best_of_n, best_vs_worst, select_files

__all__ = ["DEDUP_SCOPES", "FilterResult", "FilterSettings", "filter_files", "FilterReport", "SelectReport",
           "SHIPPED_PHRASES", "load_phrases", "MODES", "all_pairs", "best_of_n", "best_vs_worst", "select_files"]
