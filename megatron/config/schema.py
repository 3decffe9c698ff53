"""The typed configuration tree.

Every section is a dataclass; field types are enforced when YAML is loaded
(`megatron.config.load`). Derived values (data-parallel size, gradient
accumulation, padded vocab) are computed once by `megatron.config.derive` and
stored in `Config.derived`; nothing else recomputes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class KernelOpsConfig:
    """Per-op overrides of `model.kernels` (megatron/model/kernels/registry.py); auto = follow the preset."""
    norm: str = "auto"  # auto | eager | fused | compiled
    rotary: str = "auto"  # auto | eager | fused | compiled
    mlp: str = "auto"  # auto | eager | fused | compiled
    head: str = "auto"  # auto | eager | fused (LM head + log-prob in token chunks)


@dataclass
class ModelConfig:
    """Transformer shape and architecture switches.

    `arch` is informational (llama | mistral | qwen2 | gpt_neox | gpt); the
    switches below decide the actual layout so that any mix can be expressed.
    """
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: Optional[int] = None  # None -> num_attention_heads (MHA)
    ffn_hidden_size: Optional[int] = None  # None -> 4*hidden (gelu) or 8/3*hidden rounded to 64 (swiglu)
    vocab_size: int = 512
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    rotary_pct: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # HF-style dict, e.g. {rope_type: llama3, factor: 8, ...}
    parallel_residual: bool = False
    tie_embeddings: bool = False
    qkv_bias: bool = False
    linear_bias: bool = False  # bias on attention output and MLP linears (GPT-NeoX)
    attention: str = "auto"  # auto (follow model.kernels) | eager | sdpa | segments | flash
    kernels: str = "auto"  # auto | eager | fused: implementation preset of every op (norm, rotary, mlp, attention, head)
    kernel_ops: KernelOpsConfig = field(default_factory=KernelOpsConfig)
    init_std: float = 0.02
    value_head: bool = False  # scalar head for reward models (set automatically by objective rm)
    dropout: float = 0.0


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    checkpoint_num_layers: int = 1
    pipeline_partition: str = "parameters"  # parameters | uniform | list "a,b,c" of layer counts per stage
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl


@dataclass
class TrainConfig:
    iters: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16
    log_interval: int = 1
    eval_interval: int = 0  # 0 = no periodic eval
    eval_iters: int = 1
    progress_bar: bool = True
    fp16_initial_loss_scale_power: int = 16


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_iters: int = 0
    schedule: str = "constant"  # constant | linear | cosine
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    valid_path: Optional[str] = None
    format: str = "auto"  # auto | jsonl | json | parquet | csv | hf_disk | indexed
    kind: str = "auto"  # auto (detected from the record fields) | sft | pairwise | unpaired
    tokenizer: Optional[str] = None  # HF tokenizer dir, or a .model SentencePiece file
    # None: chat records use the tokenizer's own template, prompt/response strings are concatenated as is;
    # a name in megatron/data/templates (chatml, llama3, plain), 'tokenizer' (its own template, also for
    # string records) or a path to a .jinja file: applied to every record (strings become user/assistant turns)
    chat_template: Optional[str] = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"
    label_field: str = "label"
    margin_field: str = "margin"  # optional per-pair margin (pairwise), batch['margin']
    text_field: str = "text"  # plain language-modelling records {"text": ...}: SFT with loss on every token
    # optional per-response scores (pairwise): margin = score_chosen - score_rejected when no margin field;
    # both kept as batch['score_chosen'] / batch['score_rejected']
    score_chosen_field: str = "score_chosen"
    score_rejected_field: str = "score_rejected"
    pack: bool = False
    on_bad_record: str = "error"  # error: the first bad record raises | skip: drop (count) them, truncate long responses
    # fallback: when the prompt's tokens are not a prefix of the joint tokenisation (BPE merges across the
    # boundary), tokenise prompt and response separately and concatenate (TRL; counted in the report) | error
    prompt_boundary: str = "fallback"
    assistant_turns: str = "last"  # SFT chat records: last (only the final assistant turn is scored) | all
    # each sequence gets max_seq_len // (1 sft, 2 pairwise/unpaired) tokens; None = half of that
    max_prompt_len: Optional[int] = None
    cache_dir: Optional[str] = None  # where raw files are preprocessed to; None = <train_path dir>/.cache
    num_workers: int = 1
    shuffle: bool = True
    pad_to_max_len: bool = False  # rows always model.max_seq_len wide (fixed shapes), else the longest row


@dataclass
class ObjectiveConfig:
    """The objective and its own options; each objective reads the keys it knows.

    Keys an objective does not use are rejected at validation time by the
    objective's `allowed_keys` (see megatron.objectives).
    """
    name: str = "sft"
    beta: float = 0.1
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | robust | hinge; rpo: bwd_kl | fwd_kl | sq
    label_smoothing: float = 0.0
    reference_free: bool = False
    nll_weight: float = 0.0
    gamma: float = 0.5  # simpo target margin (gamma / beta ratio as in the SimPO paper's gamma)
    margin: float = 0.0  # rm: constant margin added to per-pair margins
    center_weight: float = 0.0  # rm: c in c * (r_c + r_r)^2
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    orpo_lambda: float = 0.1
    eta: float = 1.0  # rpo: scale of the reward margin score_chosen - score_rejected (batch['margin'])
    # online RL (grpo, rloo, reinforce_pp, ppo, mdloo; megatron/objectives/pg_loss.py, advantages.py)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: Optional[float] = None  # None = clip_low; > clip_low is DAPO's clip-higher (e.g. 0.28)
    importance_level: str = "token"  # token | sequence (GSPO: geometric-mean ratio per sequence)
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm
    loss_norm_len: Optional[int] = None  # seq_mean_token_sum_norm's constant length; None = generation.max_new_tokens
    kl_coef: float = 0.0  # KL(policy || reference) weight; 0 = no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_in_reward: Optional[bool] = None  # KL in the reward (advantages), not the loss; None = the objective's way
    entropy_coef: float = 0.0  # entropy bonus
    scale_rewards: str = "group"  # grpo: group | batch | none (Dr. GRPO)
    group_baseline: bool = False  # reinforce_pp: subtract the group mean reward (REINFORCE++-baseline)
    discount: float = 1.0  # ppo / reinforce_pp: the discount gamma (objective.gamma is SimPO's margin)
    lam: float = 0.95  # ppo: the GAE lambda
    vf_coef: float = 0.1  # ppo: weight of the critic's value loss
    value_clip: Optional[float] = 0.2  # ppo: value clipped to old +- value_clip; None = unclipped
    rollout_kl_coef: Optional[float] = None  # mdloo: KL(policy || rollout policy) weight (mirror step); None = 0.1


@dataclass
class ReferenceConfig:
    mode: str = "auto"  # auto (live when needed, else none) | live | precomputed | none
    load: Optional[str] = None  # checkpoint for the live reference; None = the policy's initial weights
    offload: bool = False


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory; None = no checkpoints
    load: Optional[str] = None  # directory (training checkpoint or converted HF weights)
    interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    # checkpoint.load: resume its optimizer/step/data position? None = only when it is the same run (same
    # objective and data); another run (DPO from SFT) is a new stage. checkpoint.save always resumes in full.
    load_optimizer: Optional[bool] = None
    save_on_sigterm: bool = True


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    tensorboard: bool = False


@dataclass
class LauncherConfig:
    type: str = "local"  # local | hostfile | slurm | openmpi | mpich
    num_gpus: int = 1  # processes per node (CPU ranks on a machine without GPUs)
    num_nodes: int = 1
    hostfile: Optional[str] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None  # None: deepy.py picks a free port on this machine
    include: Optional[str] = None
    exclude: Optional[str] = None
    extra_args: List[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    """Sampling for tools/generate.py and online rollouts (megatron.generation; checked by SamplingParams)."""
    input: Optional[str] = None  # JSONL: records with `prompt` text, `messages` (chat) or `prompt_ids`
    output: Optional[str] = None  # JSONL: every input field plus `completions: [{text, token_ids, logprobs, finish_reason}]`
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)  # strings that end a completion (cut from its text)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    seed: int = 0  # a sample depends on (seed, prompt index, sample index) only
    batch_size: int = 32  # sequences decoded together per rank
    hf_model: Optional[str] = None  # a Hugging Face model dir, imported on the fly instead of checkpoint.load


@dataclass
class RolloutConfig:
    """Online RL (objectives grpo, rloo, reinforce_pp, ppo, mdloo): what one step generates and how it trains on it."""
    prompts_path: Optional[str] = None  # prompt records (jsonl | json | parquet); their other fields are reward columns
    prompt_field: str = "prompt"  # the record's prompt text (or chat messages)
    num_generations: int = 4  # completions per prompt (a group)
    prompts_per_step: int = 2  # prompts per step over all data-parallel ranks (all of a prompt's samples on one rank)
    epochs: int = 1  # passes over one step's rollouts
    # optimizer steps per pass: train.global_batch_size = prompts_per_step * num_generations / minibatches completions
    minibatches: int = 1
    importance_correction: bool = False  # truncated importance sampling when the generator's log-probs differ
    importance_cap: float = 2.0  # its truncation C: weights min(pi_old / pi_generator, C)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal (no gradient)
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # the punishment at max_new_tokens (linear from 0 over the buffer)


@dataclass
class RewardConfig:
    """Reward sources of online RL (megatron.rewards): functions on text and/or a reward model, weighted."""
    function: List[str] = field(default_factory=list)  # built-in names (exact_match, math) or path/to/file.py:name
    weights: List[float] = field(default_factory=list)  # one per function (then the model); [] = all 1
    model: Optional[str] = None  # a reward-model checkpoint of ours (scored by the online loop)
    answer_field: str = "answer"  # exact_match / math: the prompt record's reference answer column


@dataclass
class ScoreConfig:
    """tools/score.py: scores for a JSONL of completions or pairs, from a reward model or an LLM judge."""
    input: Optional[str] = None  # JSONL: tools/generate.py output (`completions`) or prompt/chosen/rejected pairs
    output: Optional[str] = None  # the same records plus completions[i].score (pairs: score_chosen, score_rejected)
    report: Optional[str] = None  # JSON counts (scored, unscored by reason, judge parses); None = <output>.report.json
    model: Optional[str] = None  # a reward-model checkpoint of ours (value head): the score of prompt + response
    judge_model: Optional[str] = None  # or an LM checkpoint of ours that grades each response (generation engine)
    judge_template: Optional[str] = None  # YAML (template, grade_regex, min_grade, max_grade); None = shipped one
    judge_max_new_tokens: int = 16
    judge_temperature: float = 0.0  # 0 = greedy
    judge_seed: int = 0
    batch_size: int = 32  # sequences per reward-model forward or judge generation batch, per rank


@dataclass
class LoopConfig:
    """tools/iterate.py: rounds of generate -> score -> filter -> select -> SFT -> DPO/RPO (megatron/frontier/loop*)."""
    rounds: int = 2  # training rounds; rounds.jsonl gets rounds + 1 lines (round 0 = the starting policy)
    prompts: Optional[str] = None  # JSONL prompt records (prompt | messages | prompt_ids), generated every round
    heldout_prompts: Optional[str] = None  # prompts for win_rate against the previous policy; None = no win rate
    policy: Optional[str] = None  # starting policy checkpoint; None = checkpoint.load, else trained (start_policy)
    start_policy: Dict[str, Any] = field(default_factory=dict)  # config fragment: train the starting policy first
    start_reward: Dict[str, Any] = field(default_factory=dict)  # config fragment: train score.model first (unset)
    committee: List[str] = field(default_factory=list)  # more checkpoints generating every round (pooled, iTeC)
    train: List[str] = field(default_factory=lambda: ["sft", "preference"])  # training phases per round, in order
    sft: Dict[str, Any] = field(default_factory=dict)  # config fragment of the SFT phase (best-of-n records)
    preference: Dict[str, Any] = field(default_factory=dict)  # fragment of the pairs phase (default objective rpo)
    pairs: str = "best-vs-worst"  # best-vs-worst | all-pairs
    min_margin: float = 0.0  # pairs need score_chosen - score_rejected above this
    filter: Dict[str, Any] = field(default_factory=dict)  # megatron.frontier.FilterSettings fields
    evaluate: bool = False  # run tools/evaluate.py (the `evaluate:` section) on every round's policy


@dataclass
class EvaluateConfig:
    """tools/evaluate.py: lm-evaluation-harness on a checkpoint of ours, exported to Hugging Face format."""
    model: Optional[str] = None  # checkpoint of ours; None = checkpoint.load
    tasks: List[str] = field(default_factory=lambda: ["tiny_mc"])  # task names in task_dir (or lm-eval's own)
    task_dir: Optional[str] = None  # folder of local task YAML files; None = data/tiny/eval (the shipped tiny task)
    limit: Optional[int] = None  # documents per task; None = all
    batch_size: int = 8
    output: Optional[str] = None  # results JSON; None = <logging.dir>/eval.json


@dataclass
class Derived:
    """Values computed once from the rest (megatron.config.derive)."""
    world_size: int = 1
    data_parallel: int = 1
    grad_accum: int = 1
    padded_vocab_size: int = 0
    num_kv_heads: int = 0
    ffn_hidden_size: int = 0
    head_dim: int = 0
    reference_mode: str = "none"   # live|precomputed|none, from the objective (megatron.objectives.resolve)
    data_kind: str = "auto"        # sft|pairwise|unpaired: what the objective consumes (auto until resolved)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # extra keys passed to DeepSpeed as-is
    derived: Derived = field(default_factory=Derived)
