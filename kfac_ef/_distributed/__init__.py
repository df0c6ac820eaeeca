"""Data-parallel K-FAC on torch.distributed: everything that crosses process boundaries.

This is the only module of kfac_ef that talks to other processes. W ranks each run the same
model on their own local batch (typically under DistributedDataParallel, which averages the
gradients). Four things are communicated, all on a process group of their own (a copy of
the given group, so that K-FAC's asynchronous collectives never interleave with DDP's):

1. **Factor statistics** (all-reduce, sum), on statistics steps only. Each rank packs the
   upper triangles of its raw sums S_A = Σ ã ãᵀ and S_G = Σ γ γᵀ (γ the observed output
   gradients), one triangle per stored block (a diagonal factor is its vector of entries, a
   block-diagonal one its blocks' triangles, see _factors.py), and the sums S = Σ_n ĝ_n² of
   the diagonally preconditioned parameters (scaled like S_G), with its row and example
   counts, in the factor dtype, into buckets of about ``bucket_cap_mb``. A bucket is launched
   asynchronously from the capture path as soon as every module feeding it has recorded
   its calls of the backward pass, so that the reduction runs while backward goes on;
   ``step()`` launches what is left and waits. The reduced sums give the statistics of the
   global batch exactly (docs/distributed.md, "Scaling"):

       A = Σ_r S_A,r / Σ_r rows_r
       G = Σ_r N_r² S_G,r / Σ_r N_r     loss_reduction="mean" (δ_n = N_r γ_n on rank r)
       G = Σ_r S_G,r / W²              loss_reduction="sum"  (DDP averages: L = Σ_r L_r / W)

   (with fisher_type="mc" the sampled backward observes δ_n itself: no N_r² for "mean")

   (diagonal Fishers F like G), each divided by σ² with a loss scale σ (grad_scaler).

   With ``factor_sync="decomposition"`` nothing is sent on statistics steps: each rank keeps
   running factors of its own batches, and the running factors themselves are averaged
   (all-reduce) just before each decomposition.

   With ``fisher_type="mc"`` the statistics are those of the sampled-target backward and
   travel the same way. With ``damping_mode="ekfac"`` the second moments in the eigenbases,
   Σ_n (Q_Gᵀ ∇̂_n Q_A)², are all-reduced in ``step()`` after the decomposition (one buffer,
   scaled like S_G); this needs every eigenbasis on every rank ("comm_opt") and
   ``factor_sync="update"`` (checked at construction).
2. **Decompositions** (broadcast), on decomposition steps. Every factor with an eigenbasis
   has one owner, which decomposes it; the owners are chosen by greedy
   longest-processing-time over the cost blocks·nb·bs³ (blocks·d³ for a dense factor).
   Diagonal factors are decomposed (O(d)) by every rank that needs them. Eigenbases and
   eigenvalues ("exact"), or the packed damped inverses ("pi"), go to the ranks that
   precondition the layer (its *gradient workers*).
3. **Preconditioned gradients** (broadcast), every step, when a layer has fewer gradient
   workers than there are ranks: a gradient worker preconditions the layer and broadcasts
   the result (the layer's [∇W | ∇b] views into p.grad) to the ranks of its row, which
   hold no decomposition of that layer. Diagonal parameters are preconditioned everywhere.
4. **The loss-change constraint** (all-reduce, a few numbers), every step with a constraint
   or ``track_loss_changes``: Σ_n u_n², the example count and the loss moments over every
   rank (E[(Δℓ)²] and the relative target are those of the global batch), and, with several
   columns, the Kronecker forms of each column's layers over the ranks of a row.

``grad_worker_fraction`` f sets the gradient workers per layer to n_g ≈ f·W (a divisor of
W): ranks form a grid of n_g rows by m = W/n_g columns, every layer is assigned to one
column (its n_g ranks are its gradient workers, one per row), and row i's worker of a layer
broadcasts its preconditioned gradient within row i. Presets: "comm_opt" (f = 1: every rank
holds every decomposition, no gradient traffic), "mem_opt" (n_g = 1: one rank per layer
decomposes and preconditions, then broadcasts the gradient), "hybrid" (f = 1/2).

Under FSDP2 (``fully_shard``) the same statistics, plan and decompositions serve a model
whose parameters and gradients are sharded by rows; the gradients go to their workers and
back by all-to-all instead of item 3 (``sharded.py`` describes it).

Every collective is waited on with the process group's timeout; a failure (a peer that died
or stopped calling ``step()``) is re-raised as a RuntimeError that says so.
"""
