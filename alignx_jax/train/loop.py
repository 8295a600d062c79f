"""The training run: start-up, resume, the precomputed reference pass, the step loop, saving.

`run_training(cfg)` is the whole run for a loaded config; a `Trainer` holds its state as attributes
(the loader, params and optimizer state, counters saved with checkpoints) and each phase is one
method. What the step computes is `train.step`; what a batch holds is `alignx_jax.batch`.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignx_jax import allocator, distributed, paths
from alignx_jax import sharding as shd
from alignx_jax import workdir as workdir_lib
from alignx_jax.batch import BatchBuilder, agree_max, batch_shardings, check_microbatch_split, put_batch
from alignx_jax.config_rules import check_input_paths, validate_config
from alignx_jax.config_schema import joint_head, two_stage_head, uses_predicted
from alignx_jax.data import batching, contrast, sources
from alignx_jax.errors import AlignXError, ConfigError, DataError
from alignx_jax.hardware import AUTO, matmul_precision
from alignx_jax.metrics import MetricsWriter, host_costs, host_usage, progress_bar
from alignx_jax.pba import stages as pba_stages
from alignx_jax.train.checkpoints import TrainerCheckpoints, nonfinite_error
from alignx_jax.train.setup import (
    derived_fingerprint,
    ensure_data,
    prepare_workdir,
    stopped_in_start_up,
    sync,
    warn_skipped,
    with_concrete_dtype,
    write_reference,
)
from alignx_jax.train.signals import StopFlag
from alignx_jax.train.state import (
    HeadCodec,
    LoraCodec,
    ParamsCodec,
    build_policy,
    load_tokenizer_for,
    make_head_optimizer,
    make_optimizer,
    past_context,
    rules_from_config,
    tree_shardings,
)
from alignx_jax.train.step import (
    eval_metrics,
    jit_eval_step,
    jit_ref_logps,
    jit_train_step,
    reference_needed,
)


def run_training(cfg: ml_collections.ConfigDict, stop: StopFlag | None = None) -> int:
    """The whole run for a loaded config; returns the exit status. `stop`: the caller's flag, to learn after
    the run whether a signal came (one in the last step finishes the run, saved, with exit 0 too)."""
    stop = stop or StopFlag()
    stop.install()  # first: a SIGTERM during start-up (data, model, compile) is a clean exit 0
    held: list[workdir_lib.WorkdirLock] = []
    try:
        return Trainer(cfg, stop).run(held)
    except OSError as e:  # a full disk, a permission: one line naming the file
        where = e.filename or paths.absolute(cfg.workdir or ".")
        raise AlignXError(f"{where}: {e.strerror or e}; the run stopped ({_rerun_hint(e)})") from None
    finally:
        for lock in held:
            lock.release()
        stop.restore()


def _rerun_hint(e: OSError) -> str:
    """What to do after the OSError `e` stopped a run: the same command resumes, unless it may not write there."""
    if e.errno == errno.EROFS:
        return "choose a workdir on a writable file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "give this user access to it (or choose another workdir), then rerun the same command"
    return "rerun the same command to resume from the last checkpoint"


class _StoppedInStartUp(Exception):
    """SIGTERM/SIGINT before the first step: nothing to save, exit 0."""


def batch_split_error(cfg: ml_collections.ConfigDict, mesh, rules) -> AlignXError | None:
    """The one-line error of a global batch that does not split over the processes and microbatches, of a
    microbatch whose pairs do not split over the processes' batch shards, of batch shards that do not
    split over the processes, or of an odd batch per process under `data.twins` (None when all split)."""
    gb, pc = int(cfg.train.global_batch), jax.process_count()
    num_micro = gb // int(cfg.train.micro_batch or gb)
    if gb % pc or (gb // pc) % num_micro:
        return ConfigError(
            f"train.global_batch={gb} must split evenly over {pc} processes and {num_micro} microbatches"
        )
    if cfg.data.twins and (gb // pc) % 2:  # the loader refused it once the workdir held its data
        hosts = f" over {pc} processes" if pc > 1 else ""
        return ConfigError(
            f"data.twins: train.global_batch={gb}{hosts} makes batches of {gb // pc} pairs per process, an odd "
            "number (rows 2k and 2k+1 are twins and share a batch); make it even"
        )
    # data.packing: the data decides a microbatch's rows (put_batch checks them); the mesh's layout is checked
    # now, with one row per batch shard
    rows = int(mesh.shape["data"] * mesh.shape["fsdp"]) if cfg.data.packing else gb // num_micro
    try:
        check_microbatch_split(rows, mesh, rules)
    except AlignXError as e:
        return e
    return None


class Trainer(TrainerCheckpoints):
    """One run of `alignx train`. `run` calls the phases in order; every phase reads and sets attributes."""

    def __init__(self, cfg: ml_collections.ConfigDict, stop: StopFlag):
        self.cfg = cfg
        self.stop = stop
        self.rows_truncated = 0  # rows whose prompt was cut to fit (saved with the loader state)
        self.skipped_total = 0  # non-finite steps skipped (loss.nan_policy='skip'), saved too
        # of those, skipped since the last finite step: saved, so a resume stops where a run would
        self.in_a_row = 0
        self.empty_steps = 0  # steps of the run whose batch kept no pair (every row dropped), saved too
        self.warned_empty = False  # this invocation said which step was the first without a pair
        self.predicted: np.ndarray | None = None  # [N, 90] first-stage P~, before the first batch
        self.ref_params: Any = None
        self.ref_table: np.ndarray | None = None
        self.head_codec = self.head_tx = self.head_cfg = None
        self.start = 0
        self.latest: int | None = None

    # ------------------------------------------------------------------------- phases

    def run(self, held: list) -> int:
        try:
            self.set_up(held)  # checks the config and makes model.dtype concrete
            # every program the run traces multiplies at model.matmul_precision (JAX reads it at trace time)
            given = str(self.cfg.model.matmul_precision)
            with matmul_precision(given, str(self.cfg.model.dtype)) as level:
                if self.is_main and level != "default":
                    why = f"auto -> {level} ({self.cfg.model.dtype} on {jax.default_backend()})"
                    print(
                        f"alignx train: model.matmul_precision {why if given == AUTO else given}",
                        file=sys.stderr,
                    )
                self.open_data()
                self.build_state()
                self.restore()
                if self.precomputed:
                    self.precompute_reference()
                self.step_fn = jit_train_step(
                    self.codec,
                    self.tx,
                    self.cfg,
                    param_shardings=self.param_sh,
                    opt_shardings=self.opt_sh,
                    replicated=self.rep,
                    head_codec=self.head_codec,
                    head_tx=self.head_tx,
                )
                if self.eval_every:
                    self.eval_fn = jit_eval_step(self.codec, self.cfg, self.head_codec)
                self.check_stop()
                return self.train()  # raises no _StoppedInStartUp: its stops are step-boundary saves
        except _StoppedInStartUp:
            return stopped_in_start_up(self.stop, self.is_main)

    def check_stop(self) -> None:
        """Start-up: stop before the first step when a signal arrived (on any process, see `stop_agreed`)."""
        if self.stop_agreed() is not None:
            raise _StoppedInStartUp

    def stop_agreed(self, step: int | None = None) -> int | None:
        """The stop signal every process acts on at this boundary, or None to go on.

        One process: its own flag. Several: a SIGTERM may reach one host only (a maintenance event), and a
        host that saves (a collective) while the others step deadlocks; so every process calls this at the
        same boundaries and all agree through one tiny all-gather of the flags, ORed with JAX's preemption
        sync point (`step`: the loop's boundaries; its service is there when jax.distributed is, e.g. TPU).
        """
        local = self.stop.signum
        if getattr(self, "pc", 1) <= 1:
            return local
        from jax.experimental import multihost_utils

        agreed = int(np.max(multihost_utils.process_allgather(np.int32(local or 0))))
        if not agreed and step is not None:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    agreed = int(signal.SIGTERM)
            except RuntimeError:  # no preemption sync manager (jax_enable_preemption_service off)
                pass
        if agreed and self.stop.signum is None:
            self.stop.signum = agreed  # a signal to another host: this one stops with it
        return agreed or None

    def set_up(self, held: list) -> None:
        """Config checks, the mesh, the tokenizer, the workdir (taken and checked on the main process)."""
        cfg = self.cfg
        validate_config(cfg)
        if cfg.train.distributed:  # idempotent: a launcher's job (alignx_jax.distributed) is joined once
            distributed.initialize()
        missing = None
        try:
            # before the workdir is taken; after the job is joined: preparing smollm2 or a .gguf runs JAX
            check_input_paths(cfg)
        except AlignXError as e:
            missing = e
        if distributed.is_initialized():  # a path one host lacks stops all (the others waited for it)
            distributed.agree(missing, "checking the input paths")
        elif missing is not None:
            raise missing
        self.mesh = shd.mesh_from_config(cfg.mesh)
        if cfg.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":  # before any loading
            raise ConfigError(
                f"model.attention_impl=cudnn needs a GPU (this machine's devices are {jax.default_backend()}); "
                "use --config.model.attention_impl=auto (cudnn where it applies) or xla"
            )
        self.rules = rules_from_config(cfg)
        # before the workdir is taken: a batch that cannot split left W holding its lock and synthetic data
        distributed.agree(batch_split_error(cfg, self.mesh, self.rules), "checking the batch split")
        # before the workdir is taken: a model folder without tokenizer files left W holding only its lock
        self.tokenizer, self.tokenizer_dir = load_tokenizer_for(cfg)
        self.workdir = paths.absolute(cfg.workdir)
        self.is_main = jax.process_index() == 0
        self.pc, self.pi = jax.process_count(), jax.process_index()
        # on every process: all refuse a user's folder together
        workdir_lib.check_run_folder(self.workdir, writes_data=not cfg.data.train)
        error = None
        if self.is_main:
            try:
                held.append(prepare_workdir(cfg, self.workdir))
            except Exception as e:  # a held lock, a changed config: the other processes stop too, not wait
                error = e
        distributed.agree(error, "preparing the workdir")
        self.cfg_given = cfg  # what W/config.json records (`auto` dtypes as given)
        sync("workdir")
        self.cfg = cfg = with_concrete_dtype(cfg, self.is_main)
        if self.is_main and jax.default_backend() == "cpu":
            # whether each step faults its temporaries in again (host/page_faults) depends on it
            print(
                f"alignx train: host allocator {allocator.active()} ({allocator.ENV}={allocator.configured()})",
                file=sys.stderr,
            )

    def open_data(self) -> None:
        """Data source, loader, batch builder and the run's length in steps."""
        cfg = self.cfg
        self.data_path = ensure_data(cfg, self.workdir, self.is_main)
        self.check_stop()
        self.source = sources.open_source(self.data_path, skip_bad=bool(cfg.data.skip_bad_rows))
        self.rows_skipped = int(getattr(self.source, "skipped", 0))
        warn_skipped(self.source, "training", self.is_main)
        if len(self.source) == 0:
            raise AlignXError(f"{self.data_path}: no training rows")
        if cfg.data.twins:
            rows = [self.source[i] for i in range(len(self.source))]
            contrast.check_twins(rows, file=self.data_path, where=self.source.where)
        self.gb = gb = int(cfg.train.global_batch)
        self.num_micro = gb // int(cfg.train.micro_batch or gb)
        self.seed = int(cfg.train.seed)
        self.joint = joint_head(cfg)
        self.two_stage = two_stage_head(cfg)
        if self.two_stage:
            pba_stages.check_head_rows(cfg, self.source)
        self.use_predicted = uses_predicted(cfg)
        if self.use_predicted:
            pba_stages.check_head_rows(cfg, self.source, first_stage=True)
        self.persona_length = int(cfg.pba.max_persona_tokens) if self.joint else None
        pad_id = int(self.tokenizer.pad_token_id)
        self.builder = BatchBuilder.from_config(cfg, self.mesh, pad_id, head=self.joint, rules=self.rules)
        # the loader's own message names its arguments (pairs_per_batch, drop_remainder), not config keys
        if sources.shard_rows(len(self.source), self.pc, twins=bool(cfg.data.twins)) < gb // self.pc:
            hosts = f" over {self.pc} processes" if self.pc > 1 else ""
            raise ConfigError(
                f"{self.data_path}: {len(self.source)} training rows make no full batch of "
                f"train.global_batch={gb} pairs{hosts}; lower train.global_batch or add rows"
            )
        self.loader = self.new_loader()
        self.eval_every = int(cfg.train.eval_every)
        if not self.eval_every and cfg.data.eval and self.is_main:  # not silently unused
            print(
                f"alignx train: warning: data.eval={cfg.data.eval} is not read: train.eval_every=0 "
                "(set train.eval_every=N to score it every N steps)",
                file=sys.stderr,
            )
        if self.eval_every:  # train.eval_every: the held-out rows data.eval, read once per evaluation
            self.eval_source = sources.open_source(
                cfg.data.eval, split=sources.HELD_OUT, skip_bad=bool(cfg.data.skip_bad_rows)
            )
            warn_skipped(self.eval_source, "held-out", self.is_main)
            if len(self.eval_source) == 0:
                raise AlignXError(f"{cfg.data.eval}: no evaluation rows")
            if self.is_main:  # which split of a split or prepared folder is scored
                print(f"alignx train: held-out rows {self.eval_source!r}", file=sys.stderr)
        self.total_steps = (
            int(cfg.train.steps)
            if cfg.train.steps > 0
            else max(1, int(cfg.train.epochs) * self.loader.steps_per_epoch)
        )

    def profile_for(self, index: int) -> np.ndarray | None:
        """The predicted P~ for this row when the run renders predicted profiles for it, else None (golden)."""
        if not self.use_predicted:
            return None
        # mix: a fixed choice per row, independent of the history-sampling rng and of the epoch
        if self.cfg.pba.preference == "mix" and (
            np.random.default_rng([self.seed, 0x5042, int(index)]).random()
            >= float(self.cfg.pba.mix_predicted)
        ):
            return None
        return self.predicted[index]

    def example(self, row, rng, index, source=None):
        """One row of `source` (data.train's by default) as a DPOExample (the loader's example_fn);
        counts truncated prompts."""
        ex = self._make_example(row, rng, index, source)
        self.rows_truncated += int(ex is not None and ex.truncated)
        return ex

    def eval_example(self, row, rng, index):
        return self.example(row, rng, index, self.eval_source)

    def example_length(self, row, rng, index) -> int:
        """The row's token length as a batch would hold it (`data.length_groups`); counts nothing."""
        ex = self._make_example(row, rng, index)
        if ex is None:
            return 0
        # data.share_prompt rows hold the prompt and both responses
        return (
            len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)
            if self.cfg.data.share_prompt
            else ex.length
        )

    def _make_example(self, row, rng, index, source=None):
        try:
            return self._make_example_of(row, rng, index)
        except DataError as e:
            if e.file is not None:
                raise
            file, at = (source or self.source).where(index)  # a row-level error names its file and row
            raise e.at(file=file, row=at) from None

    def _make_example_of(self, row, rng, index):
        cfg = self.cfg
        return batching.make_example(
            self.tokenizer,
            row,
            method=cfg.data.method,
            persona=cfg.data.persona,
            max_length=int(cfg.data.max_length),
            prompt_format=cfg.data.prompt_format,
            rng=rng,
            overflow=cfg.data.overflow,
            index=index,
            profile=self.profile_for(index),
            persona_length=self.persona_length,
            pba_preference="history" if cfg.pba.preference == "history" else "golden",
        )

    def new_loader(self, example_fn=None) -> sources.TrainLoader:
        cfg = self.cfg
        return sources.TrainLoader(
            self.source,
            example_fn or self.example,
            pairs_per_batch=self.gb // self.pc,
            pad_id=int(self.tokenizer.pad_token_id),
            buckets=tuple(int(b) for b in cfg.data.buckets),
            seed=self.seed,
            shuffle=bool(cfg.data.shuffle),
            num_epochs=None,
            on_drop="pad",
            shard_index=self.pi,
            shard_count=self.pc,
            length_groups=int(cfg.data.length_groups),
            length_fn=self.example_length,
            twins=bool(cfg.data.twins),
            history=str(cfg.data.history),
        )

    def eval_loader(self) -> sources.TrainLoader:
        """One pass over data.eval in file order, each process its shard; the last batch padded."""
        return sources.TrainLoader(
            self.eval_source,
            self.eval_example,
            pairs_per_batch=self.gb // self.pc,
            pad_id=int(self.tokenizer.pad_token_id),
            buckets=tuple(int(b) for b in self.cfg.data.buckets),
            seed=self.seed,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            on_drop="pad",
            shard_index=self.pi,
            shard_count=self.pc,
            history="all",  # held-out rows are scored as `alignx eval` scores them: the whole history
        )

    def build_state(self) -> None:
        """Policy (and joint head), the reference copy, optimizers and their placements."""
        cfg, mesh = self.cfg, self.mesh
        policy = build_policy(cfg, self.tokenizer, mesh, self.rules)
        if self.is_main and (warning := past_context(cfg, policy.cfg)):
            workdir_lib.warn(warning)
        write_reference(cfg, policy, self.workdir, self.tokenizer_dir, self.is_main)
        if self.use_predicted:
            self.predicted = pba_stages.predicted_directions(
                cfg,
                policy,
                self.tokenizer,
                self.source,
                self.workdir,
                derived_fingerprint(cfg, self.data_path),
            )
        self.check_stop()
        self.codec = (LoraCodec if policy.cfg.lora_rank else ParamsCodec).of(policy)
        params = nnx.to_pure_dict(nnx.state(policy))
        hidden_size = int(policy.cfg.hidden_size)
        del policy
        compute_dt = jnp.dtype(cfg.model.dtype)
        # a separate buffer even when dtypes agree: the policy's buffers are donated to the step
        if self.codec.lora:  # model.lora: the adapters train; the frozen base (also the reference) is apart
            params, self.ref_params = self.codec.split(params)
        elif reference_needed(cfg.loss):  # reference-free runs (loss.reference=none, orpo, simpo) keep none
            self.ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=compute_dt, copy=True), params)
        self.tx, schedule = make_optimizer(cfg.optim, self.total_steps, int(cfg.model.frozen_layers))
        self.schedule = jax.jit(schedule)  # the logged rate: one compiled program, not one per eager op
        if self.joint:
            head = pba_stages.build_head(cfg, hidden_size, mesh, self.rules)
            self.head_cfg, self.head_codec = head.cfg, HeadCodec.of(head)
            self.head_tx = make_head_optimizer(cfg.pba)
            params = {"policy": params, "head": HeadCodec.params(head)}
            opt_state = {"policy": self.tx.init(params["policy"]), "head": self.head_tx.init(params["head"])}
            del head
        else:
            opt_state = self.tx.init(params)
        self.param_sh = tree_shardings(params, mesh)
        self.opt_sh = tree_shardings(opt_state, mesh)
        self.params = params
        self.opt_state = jax.device_put(opt_state, self.opt_sh)
        self.rep = NamedSharding(mesh, PartitionSpec())
        self.precomputed = cfg.loss.reference == "precomputed" and reference_needed(cfg.loss)

    def precompute_reference(self) -> None:
        """loss.reference=precomputed: one pass over the batches this run will see, stored per process;
        then the frozen copy is freed (its memory goes to training)."""
        ref_path = os.path.join(self.workdir, f"ref_logps.p{self.pi}.npy")
        want_shape = (self.total_steps, self.gb // self.pc, 2)
        # keyed by what the log-probs depend on: a same-shaped table of other data or another model is stale
        ref_key = derived_fingerprint(self.cfg, self.data_path, shape=want_shape, process=[self.pc, self.pi])
        have = (
            workdir_lib.fingerprint_matches(ref_path, ref_key)
            and workdir_lib.array_shape(ref_path) == want_shape
        )
        if not agree_max(int(not have)):  # the pass is a collective: every process runs it if one must
            self.ref_table = workdir_lib.load_array(ref_path)
        else:
            self.ref_table = self.reference_pass(want_shape)
            if self.is_main or self.pc > 1:
                workdir_lib.save_derived(ref_path, self.ref_table, ref_key)
        if not self.codec.lora:  # LoRA: the base stays (the policy is base + adapters)
            self.ref_params = None

    def reference_pass(self, want_shape: tuple[int, int, int]) -> np.ndarray:
        """The reference log-probs of every pair of every step, `[steps, local pairs, 2]`.

        A step whose pairs were all scored before (the same tokens: a later epoch of rows
        whose prompts do not vary by epoch) takes their log-probs instead of running the model again."""
        ref_fn = jit_ref_logps(self.codec, self.cfg.loss, self.rep)
        # this step's pairs, in batch order (None: a row the example fn dropped)
        keys: list[bytes | None] = []
        scored: dict[bytes, np.ndarray] = {}

        def recorded(row, rng, index):
            ex = self.example(row, rng, index)
            keys.append(None if ex is None else batching.example_key(ex))
            return ex

        pre_loader = self.new_loader(example_fn=recorded)
        saved_truncated = self.rows_truncated
        table = np.zeros(want_shape, np.float32)
        local_pairs = self.gb // self.pc
        computed = 0
        with shd.use_mesh(self.mesh, self.rules):
            # the pass takes about a third of the training's time: it shows progress as training does
            for s in progress_bar(
                range(self.total_steps),
                desc="reference log-probs",
                unit="step",
                disable=not (self.is_main and self.cfg.train.progress),
            ):
                self.check_stop()  # nothing is written: the next run does the pass again
                keys.clear()
                raw = next(pre_loader)[0]
                real = [k for k in keys if k is not None]  # the batch's pairs; dummies follow them
                # the pass is a collective: every process computes this step if one has a new pair
                if not agree_max(int(not all(k in scored for k in real))):
                    table[s, : len(real)] = [scored[k] for k in real]
                    continue
                computed += 1
                hb, _ = self.builder(raw)
                # global slot ids tell each process which of the gathered results are its own
                hb = hb.replace(
                    slot=(self.pi * local_pairs + np.arange(local_pairs, dtype=np.int32)).reshape(
                        self.num_micro, -1
                    )
                )
                batch = put_batch(hb, batch_shardings(hb, self.mesh, self.rules))
                lp, slot = jax.device_get(ref_fn(self.ref_params, batch))
                lp, slot = np.asarray(lp).reshape(-1, 2), np.asarray(slot).reshape(-1)
                mine = slot // local_pairs == self.pi
                table[s][slot[mine] % local_pairs] = lp[mine]
                scored.update((k, table[s, j]) for j, k in enumerate(real))
        self.rows_truncated = saved_truncated
        if self.is_main:
            print(
                f"alignx train: reference log-probs of {self.total_steps} steps, {computed} computed "
                f"({self.total_steps - computed} reused: their pairs were scored before)",
                file=sys.stderr,
            )
        return table

    # ------------------------------------------------------------------------- the loop

    def train(self) -> int:
        """Steps from `start` to `total_steps`, saving every `checkpoint.every_steps` and on a stop signal."""
        cfg = self.cfg
        self.writer = MetricsWriter(
            self.workdir,
            enabled=self.is_main,
            resume_step=self.start,
            wandb_project=cfg.train.wandb_project,
            wandb_config=cfg.to_dict(),
        )
        self.bar = None
        if self.is_main and cfg.train.progress:
            self.bar = progress_bar(total=self.total_steps, initial=self.start, desc="train", unit="step")
        self.step = self.start
        self.last_saved = self.latest
        try:
            while self.step < self.total_steps:
                if self.stop_agreed(self.step) is not None:  # the same step on every process
                    break
                # several processes would each see it at their own step: theirs meet at the next save's wait
                if self.pc <= 1:
                    self.ckpt.check_background()
                self.train_one_step()
            return self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            self.ckpt.close()

    def train_one_step(self) -> None:
        t0, r0 = time.perf_counter(), host_usage()
        coll, info = next(self.loader)
        hb, stats = self.builder(coll)
        if self.precomputed:
            hb = hb.replace(ref_logps=self.ref_table[self.step].reshape(self.num_micro, -1, 2))
        batch = put_batch(hb, batch_shardings(hb, self.mesh, self.rules))
        with shd.use_mesh(self.mesh, self.rules):
            self.params, self.opt_state, m = self.step_fn(self.params, self.opt_state, self.ref_params, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt, host = time.perf_counter() - t0, host_costs(r0)
        self.step += 1
        self.check_finite(m)
        self.check_pairs(m)
        m.update({f"host/{k}": v for k, v in host.items()})
        m["skipped_nonfinite_steps"] = self.skipped_total
        final_head = None
        if self.two_stage and self.step == self.total_steps:  # fit on the final policy, then saved with it
            final_head = pba_stages.fit_two_stage_head(
                self.cfg, self.codec.policy(self.params, self.ref_params), self.tokenizer, self.source
            )
            # the same head on every process (deterministic fit): one replicated global array per leaf,
            # which every process's checkpoint save takes part in
            final_head = (
                final_head[0],
                jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(self.rep, np.asarray(x)), final_head[1]
                ),
                final_head[2],
            )
            m.update(final_head[2])
        self.log(m, info, stats, dt)
        if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.total_steps):
            self.writer.write(self.step, self.evaluate_held_out())
        every = int(self.cfg.checkpoint.every_steps)
        # a run that has trained on no pair yet saves nothing: its checkpoint would make a rerun say done
        if (self.step % every == 0 or self.step == self.total_steps) and not self.trained_nothing():
            self.save(self.step, None if final_head is None else final_head[:2])
            self.last_saved = self.step

    def evaluate_held_out(self) -> dict[str, float]:
        """The `eval/` metrics (`step.eval_metrics`) of the current params on every data.eval row.

        Every process runs the same number of batches (a shorter shard's last one padded), so the jitted
        sums are global."""
        saved_truncated = self.rows_truncated  # the held-out rows are not training rows
        totals: dict[str, float] = {}
        with shd.use_mesh(self.mesh, self.rules):
            for coll, _ in self.eval_loader():
                hb, _ = self.builder(coll)
                batch = put_batch(hb, batch_shardings(hb, self.mesh, self.rules))
                sums = jax.device_get(self.eval_fn(self.params, self.ref_params, batch))
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        self.rows_truncated = saved_truncated
        return eval_metrics(totals)

    def trained_nothing(self) -> bool:
        """Every step from step 0 kept no pair (a resumed run's checkpoint had pairs: none is saved without)."""
        return self.start == 0 and self.empty_steps == self.step

    def check_pairs(self, m: dict[str, float]) -> None:
        """Say so when a step's batch kept no pair: data.overflow=drop dropped every row of it."""
        if m["pairs"] > 0:
            return
        self.empty_steps += 1
        if not self.warned_empty and self.is_main:
            self.warned_empty = True
            print(
                f"alignx train: warning: step {self.step} had no pair: every row of its batch was dropped "
                f"(longer than data.max_length={self.cfg.data.max_length} under data.overflow=drop)",
                file=sys.stderr,
            )

    def check_finite(self, m: dict[str, float]) -> None:
        """Count a non-finite step (loss.nan_policy) and stop the run when the policy says so."""
        skip_policy = self.cfg.loss.nan_policy == "skip"
        max_skipped = int(self.cfg.loss.max_skipped_steps)
        nonfinite = int(m.pop("nonfinite"))
        self.in_a_row = self.in_a_row + 1 if nonfinite else 0
        self.skipped_total += int(nonfinite != 0 and skip_policy)
        if nonfinite and (not skip_policy or self.in_a_row >= max_skipped):
            self.params = self.opt_state = None  # the bad state: its memory goes to checking the saved ones
            raise nonfinite_error(
                self.ckpt, self.targets, self.step, m, nonfinite, self.in_a_row if skip_policy else 0
            )

    def data_counters(self, info: dict[str, Any], stats: dict[str, float]) -> dict[str, float]:
        """The logged data counters of the whole job: each process reads its own shard, so its counts are
        summed and its padding fractions averaged (every process's batch has the same agreed shape)."""
        counts = [stats["real_tokens"], info["rows_dropped"], self.rows_truncated]
        fractions = [stats["padding_fraction"], stats["computed_padding_fraction"]]
        if self.pc > 1:  # one all-gather, at the same steps on every process
            from jax.experimental import multihost_utils

            rows = np.asarray(multihost_utils.process_allgather(np.asarray(counts + fractions, np.float32)))
            rows = rows.reshape(self.pc, -1)
            counts, fractions = rows[:, :3].sum(0).tolist(), rows[:, 3:].mean(0).tolist()
        out: dict[str, float] = {
            k: int(round(v)) for k, v in zip(("real_tokens", "rows_dropped", "rows_truncated"), counts)
        }
        out["rows_skipped"] = self.rows_skipped  # every process reads the whole source's row checks
        out["padding_fraction"], out["computed_padding_fraction"] = (float(f) for f in fractions)
        return out

    def log(self, m: dict[str, float], info: dict[str, Any], stats: dict[str, float], dt: float) -> None:
        step = self.step
        if step % max(1, int(self.cfg.train.log_every)) == 0 or step == self.total_steps:
            data = self.data_counters(info, stats)
            self.writer.write(
                step,
                {
                    **m,
                    "learning_rate": float(self.schedule(step - 1)),
                    "epoch": info["epoch"],
                    "tokens_per_sec": data.pop("real_tokens") / dt,
                    "step_time": dt,
                    **data,
                },
            )
        if self.bar is not None:
            # not a redraw of its own: update's redraw, every mininterval, shows it (one redraw a step, not two)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}", refresh=False)
            self.bar.update(1)

    def finish(self) -> int:
        """After the loop: a stop signal saves the last step; both ways wait for the saves and exit 0."""
        step, ckpt = self.step, self.ckpt
        if self.bar is not None:  # closed first: the lines below print on their own line, not the bar's
            self.bar.close()
            self.bar = None
        if self.stop.signum is not None and step < self.total_steps:
            saves = step > self.start and not self.trained_nothing()
            if saves and self.last_saved != step:
                self.save(step)
            ckpt.wait()
            if self.is_main:
                name = signal.Signals(self.stop.signum).name
                if saves:
                    what = f"saved step {step} to {ckpt.directory}"
                elif step > self.start:
                    what = "no step had a pair yet (every row dropped), nothing to save"
                else:
                    what = "no step run, nothing to save"
                print(
                    f"alignx train: {name} received: {what}; rerun the same command to resume",
                    file=sys.stderr,
                )
            return 0
        ckpt.wait()
        if self.trained_nothing():
            raise DataError(
                f"no step of this run had a pair: every row was dropped (longer than data.max_length="
                f"{self.cfg.data.max_length} under data.overflow=drop)",
                file=self.data_path,
            )
        if self.is_main:
            if self.empty_steps:
                print(f"alignx train: warning: {self.empty_steps} steps had no pair", file=sys.stderr)
            print(f"alignx train: done, {step} steps; checkpoints in {ckpt.directory}", file=sys.stderr)
        return 0
