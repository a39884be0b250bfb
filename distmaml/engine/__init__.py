"""One meta-iteration across processes: the step (sample, hypergradient, all-reduce, Adam), the process
group and its one all-reduce, the memory estimate, and the checks before the first iteration.

Layer: above the learner (`distmaml.build`, `problems`, `evaluate`, `config`, `tasks`, `meta`); below a
run on disk (`distmaml.run`) and the commands (`distmaml.commands`). Nothing here writes a run's files.
"""
