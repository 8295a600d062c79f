"""AlignX data: read and validate rows, render personas and prompts, build DPO batches.

Modules (one concept each):
  schema      read parquet/JSONL/JSON rows (file or folder), validate, normalise; `alignx data check`
  persona     the 90-dim preference space, profile text, the release's P~ rule, history sampling,
              the UGC/PAIR/DEMO/P persona block
  prompts     system/user messages for none/ica/pba and their token ids (chat template or `paper`)
  batching    DPO examples, length buckets, padded batch collation
  benchmarks  AlignX-test / P-SOUPS / UF-P-4 / PRISM files -> rows
  split       train/test splits by prompt, user or row; `alignx data split`
  sources     TFDS input pipeline (array_record) and the resumable loader; `alignx data prepare`
  synth       synthetic AlignX-schema users; `alignx synth`

Nothing here imports the model, training or evaluation code (see docs/ARCHITECTURE.md).
"""
