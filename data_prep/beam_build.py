"""The build as an Apache Beam pipeline: the clips spread over a runner's workers (Dataflow, Flink, Spark, or local
processes with the DirectRunner) instead of one machine's process pool.

It shares the local build's pieces (handi_jax.data.writer): the same shard plan, the same per-clip work
(`process_video`) and the same shard writer, so the same inputs and config give the same dataset, byte for byte.
The launching process plans the shards and leaves out those an earlier run finished; the pipeline runs each
pending clip on a worker, groups the results by shard, puts each shard's results back in job order and writes the
shard on a worker; then the launching process writes the split's summary files. Beam may run a bundle again (a
failed or slow worker): the shard and its progress files are replaced atomically, the progress record last, and a
second run of the same bundle writes the same bytes.
"""

import operator
import shlex
from collections.abc import Callable, Sequence

from handi_jax.data import writer

INSTALL = "pip install apache-beam==2.77.0"


def pipeline_options(runner: str, beam_options: str):
  """Beam's options from --runner and the --beam_options string (Beam's own flags, e.g. "--direct_num_workers=2");
  an option Beam does not know is an error (Beam itself would only log that it drops it)."""
  try:
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    raise ValueError(f"--runner needs Apache Beam, which is not installed: {INSTALL} (or leave --runner out for "
                     "the local build; data_prep/README.md says what Dataflow needs)") from None

  flags = [f"--runner={runner}", *shlex.split(beam_options)]
  if runner == "DirectRunner" and not any(flag.startswith("--default_sdk_harness_log_level") for flag in flags):
    flags.append("--default_sdk_harness_log_level=WARNING")  # its worker processes log to this console
  options = PipelineOptions(flags)
  unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
  if unknown:
    raise ValueError(f"--beam_options: Beam has no option {', '.join(f'--{name}' for name in sorted(unknown))}")
  return options


def _process(element: tuple, process: Callable) -> tuple[int, tuple[int, object]]:  # (shard, (position, result))
  shard, position, job = element
  return shard, (position, process(job))


def _write(element: tuple, shard_writer: writer.ShardWriter) -> None:
  shard, results = element
  shard_writer.write(shard, [result for _, result in sorted(results, key=operator.itemgetter(0))])


def write_split(data_dir, split: str, jobs: Sequence, process: Callable, *, config, settings_key: str,
                job_keys: Sequence[str], options) -> writer.SplitSummary:
  """handi_jax.data.writer.write_split's outputs, the clips processed and the shards written by a Beam pipeline
  with `options` (pipeline_options). `process` runs on the workers, so it and the jobs must be picklable."""
  import apache_beam as beam

  plan = writer.plan_split(data_dir, split, jobs, config=config, settings_key=settings_key, job_keys=job_keys)
  pending = plan.pending()
  clips = [(shard, position, jobs[i]) for shard in pending for position, i in enumerate(plan.shard_jobs[shard])]
  if clips:
    with beam.Pipeline(options=options) as pipeline:  # leaving the block runs it and waits for the end
      _ = (pipeline
           | "clips" >> beam.Create(clips)  # spreads them over the workers (Create reshuffles)
           | "process" >> beam.Map(_process, process)
           | "group by shard" >> beam.GroupByKey()
           | "write shards" >> beam.Map(_write, writer.ShardWriter.from_config(plan, config)))
  return writer.finish_split(plan, config, shards_reused=plan.num_shards - len(pending))
