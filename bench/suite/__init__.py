"""The benchmark suite: each workload (an 8B-class Llama, a prompt, a fixed number of decode steps)
run through transformers' caches and every hetero mode, beside the ceilings measured in the same run.

`python bench/run.py --all` or `hetero bench --workload NAME`; `--tiny` runs the same code on a
tiny model on the CPU (the tests do).
"""
