"""The results tool (``python -m lavis_evlgen.results``, README "Results tool"): the paper's tables
(docs/paper_results.yaml) filled from run outputs, with the paper's number and the difference in
every cell. ``paper``: the tables and their benchmarks; ``sources``: reading run outputs;
``tables``: building and rendering the tables."""
