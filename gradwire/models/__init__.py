"""Models and data for the main job: a small GPT-style decoder that splits into pipeline stages
(``gpt``), an embedded synthetic language with an exactly known entropy floor (``synthetic``), and
a single-process pipeline that compresses every stage boundary in-process (``inprocess``), and
the decoder with Megatron-style tensor parallelism inside its blocks (``tp_gpt``)."""
