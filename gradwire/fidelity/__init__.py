"""Training-fidelity measurement (issue 17): does a codec change what training reaches?

* ``stats``: paired differences across seeds with a t confidence interval, and per-step bands;
* ``baselines``: the pruning baselines of paper 001 Fig. 5 as codecs (ATP's normal-assumption
  threshold, deterministic top-k);
* ``probe``: a boundary-policy wrapper that measures, per encoded tensor, the cosine and added
  variance of the decoded gradient against the analytic pruning cosine;
* ``trainer``: the main job's in-process training loop with those measurements, the same-step
  parameter-gradient cosine and the validation loss.

``bench/fidelity.py`` runs configs x seeds with it and writes ``bench/results/fidelity.md``.
"""
