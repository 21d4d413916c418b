"""`select pick` on an engine's workers (mixlm.engine), exact: the same chosen documents and report bytes as
`pick_documents.select_documents` over whole columns, while the driver holds only per-file counts, splitters and bounded
candidate batches, never a per-document column. `select.select_on_workers` runs the whole selection;
`select run`'s classifier stage keeps its `keep_top_fraction` through `budget.budgeted_top` (mixlm.selection.stage_choice).

Every per-document array lives in per-input-file tasks, in a scratch folder `OUT/.pick-work` (a shared file
system on a cluster, as the signal tables are), removed at the end (`work_files`: its layout and arrays):

1. `work_files.join_file`: a file's rows of every signals folder, joined on line (as `load_tables` joins them),
   with an evenly spaced sample of each column.
2. Percentile ranks (`ranks.rank_scores`), a range-partitioned sample sort per weighted signal: splitters from
   the samples (-inf, where NaN sorts, always one of them); per file, the documents per splitter value and per
   interval between splitters (`count_groups`); the driver turns those counts into offsets; an engine shuffle
   sends each interval's documents to one reduce task that sorts them and writes their mid-ranks
   (`rank_interval`); documents equal to a splitter get theirs from the counts alone. Equal values share an
   interval or a splitter, so no tie straddles two tasks. `assemble_scores` sums w_i / sum(w) * pct_i per
   file in the weights' order, as `combine_scores` does, so the scores are bitwise equal.
3. The budget (`budget.budgeted_top`): per file, the eligible documents (size > 0) sorted by (-score, global
   index) with cumulative sizes; rounds of a weighted sample of keys per file, then per-file counts at the
   chosen splitters, narrow the range holding the first document that does not fit, until at most
   `max_candidates` documents remain and are fetched and walked (`boundary.find_boundaries`, over the sorted
   per-file datasets). The greedy fill after it (`budget.fill_candidates`) fetches the best `max_candidates`
   documents per file that still fit what is left, walks them in order up to the first file's last fetched key,
   and repeats until no file has one that fits. `top_fraction` is the same boundary over counts; mode
   dsir-resample the same over Gumbel keys (`budget.gumbel_keys`: each file draws from the seed's one stream at
   its own offset, so the keys are `importance_resample`'s).
4. Summaries over all and chosen documents (`signal_summaries`): quantiles are order statistics found by the
   same boundary search (batched over every column), interpolated as `np.percentile` does; means are numpy's
   pairwise sum, rebuilt from per-file sums of its subtrees (`pairwise_sums`).

One thing still scales with the corpus on the driver: the random baseline (`random_baseline`), whose permutation
of the eligible documents (one int64 each) is numpy's, drawn there so the bytes match `select_random` (their
sizes are fetched in batches). The mix comes from the write tasks, each counting its file's groups
(`documents.write_records(mix=)`).
"""

from mixlm.selection.distributed_pick.budget import budgeted_top
from mixlm.selection.distributed_pick.random_baseline import random_rows
from mixlm.selection.distributed_pick.ranks import rank_scores
from mixlm.selection.distributed_pick.select import chosen_lines, select_on_workers
from mixlm.selection.distributed_pick.signal_summaries import pairwise_sums, summaries, summary_sets
from mixlm.selection.distributed_pick.work_files import WORK, Layout, even_sample, load_array, save_array

__all__ = ["WORK", "Layout", "budgeted_top", "chosen_lines", "even_sample", "load_array", "pairwise_sums",
           "random_rows", "rank_scores", "save_array", "select_on_workers", "summaries", "summary_sets"]
