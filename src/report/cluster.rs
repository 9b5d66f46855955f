//! Per-class strategy clustering of attribution maps (spectral relevance analysis, SpRAy).
//!
//! Given the attribution maps of one class, SpRAy (Lapuschkin et al. 2019, "Unmasking Clever Hans
//! predictors and assessing what machines really learn") groups them by *where* the model looks:
//! maps are shrunk to a small common grid, connected in a k-nearest-neighbour graph, and split by
//! spectral clustering. Each cluster is one prediction "strategy"; a small cluster whose mean map
//! sits on a watermark, border or background patch is the classic Clever-Hans signature.
//!
//! [`spray`] runs the whole analysis:
//!
//! 1. **Features.** Every map is area-downsampled to `side × side` with exact box averaging
//!    (the same bins as PyTorch's `adaptive_avg_pool2d`, see [`area_downsample`]) and normalised to
//!    sum 1, so clusters reflect the *distribution* of relevance, not its magnitude. Negative and
//!    non-finite values are treated as 0; an all-zero map stays all zero.
//! 2. **Size handling.** With `n ≤ 2` maps everything is cluster 0. With `n > max_samples` a
//!    seeded, deterministic subsample of `max_samples` maps is clustered and every other map is
//!    assigned to the cluster whose mean (normalised) map is nearest in Euclidean distance.
//! 3. **Affinity.** Binary symmetric kNN graph on Euclidean distances, `k = min(k_neighbors, n-1)`:
//!    `A_ij = 1` when `i ∈ kNN(j)` or `j ∈ kNN(i)`, else 0 (distance ties broken by index).
//!    Normalised Laplacian `L = I − D^{-1/2} A D^{-1/2}`; a node of degree 0 gets `L_ii = 0`
//!    (it forms its own connected component).
//! 4. **Number of clusters.** `L` is fully eigen-decomposed (nalgebra `SymmetricEigen`),
//!    eigenvalues sorted ascending `λ_1 ≤ λ_2 ≤ …`. Let `K = min(max_clusters, n − 1)` and `c`
//!    the number of connected components (pieces) of the kNN graph (`λ_1 = … = λ_c = 0`; each
//!    piece holds at least `k_neighbors + 1` maps).
//!    - `c ≥ K`: `k = K`, and k-means (step 5) groups whole pieces.
//!    - `2 ≤ c < K`: every piece is its own cluster, never merged with part of another (k-means
//!      could split a large piece rather than keep a small, distinct one apart: the Clever-Hans
//!      group this is for); a piece of more than two maps is analysed again on its own maps, with
//!      what is left of the `K` clusters, larger pieces first.
//!    - `c = 1`: of the `i` in `2..=K` whose first `i` eigenvalues sit clearly below the next
//!      (`λ_i / λ_{i+1} ≤` [`MAX_EIGEN_RATIO`] and `λ_{i+1} − λ_i ≥` [`MIN_EIGENGAP`]), the one
//!      with the smallest ratio; else `k = 1`. Maps that vary smoothly around one place (a
//!      jittered blob) have steadily growing eigenvalues in small steps that grow too, which the
//!      plain largest-gap rule took for the most clusters allowed. All-identical feature maps
//!      give `k = 1` without a spectral step.
//!    - Note: a group of at most `k_neighbors` maps cannot form its own piece and is only
//!      separated if its few bridging edges leave a clear gap in the spectrum.
//! 5. **Labels.** Spectral embedding from the `k` eigenvectors of the smallest eigenvalues, rows
//!    normalised to unit length (Ng–Jordan–Weiss), then k-means (k-means++ seeding with the
//!    seeded PRNG, 10 restarts × at most 100 Lloyd iterations, lowest inertia kept). Clusters are
//!    relabelled by descending size (ties: the cluster containing the lower map index first), so
//!    cluster 0 is the largest; empty clusters are dropped.
//! 6. **Summary.** Per cluster the size and the mean of its normalised `side × side` maps.
//!
//! The result is a pure function of the input and [`ClusterParams`] (including `seed`).
//! Cost: O(n²·side²) for distances plus a dense O(n³) eigen-decomposition of the `n × n`
//! Laplacian, `n ≤ max_samples`.

use nalgebra::{DMatrix, SymmetricEigen};

/// Largest ratio `λ_k / λ_{k+1}` at which a connected kNN graph is split into `k` clusters (see
/// [`eigengap_k`]).
pub const MAX_EIGEN_RATIO: f64 = 0.5;
/// Smallest eigengap `λ_{k+1} − λ_k` at which a connected kNN graph is split into `k` clusters
/// (normalised Laplacian eigenvalues lie in 0..2; see [`eigengap_k`]).
pub const MIN_EIGENGAP: f64 = 0.05;

/// k-means restarts (each with its own k-means++ seeding).
const KMEANS_RESTARTS: usize = 10;
/// Maximum Lloyd iterations per k-means restart.
const KMEANS_MAX_ITER: usize = 100;

/// Parameters of [`spray`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterParams {
    /// Neighbours per node in the kNN affinity graph (capped at `n − 1`; 0 is treated as 1).
    pub k_neighbors: usize,
    /// Largest number of clusters the eigengap rule may choose (0 is treated as 1).
    pub max_clusters: usize,
    /// Largest number of maps that enter the dense spectral step; more maps are subsampled and
    /// the rest assigned to the nearest cluster mean (0 is treated as 1).
    pub max_samples: usize,
    /// Maps are area-downsampled to `side × side` before clustering (0 is treated as 1).
    pub side: usize,
    /// Seed for subsampling and k-means initialisation.
    pub seed: u64,
}

impl Default for ClusterParams {
    fn default() -> Self {
        ClusterParams { k_neighbors: 10, max_clusters: 6, max_samples: 1500, side: 16, seed: 0 }
    }
}

/// Result of [`spray`].
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of each input map, in input order, each in `0..k`. Cluster 0 is the largest.
    pub labels: Vec<usize>,
    /// Number of (non-empty) clusters; 0 only for empty input.
    pub k: usize,
    /// The smallest eigenvalues of the normalised Laplacian, ascending (`min(max_clusters + 1, n)`
    /// of them; of the subsample's graph when subsampling). Empty when `n ≤ 2` or when all maps
    /// are identical (no spectral step is run).
    pub eigenvalues: Vec<f64>,
    /// Per cluster, the mean of its members' normalised `side × side` maps (row-major).
    pub mean_maps: Vec<Vec<f32>>,
    /// Per cluster, the number of member maps (descending).
    pub sizes: Vec<usize>,
    /// Side of the feature grid: each of `mean_maps` is `side × side` (`ClusterParams::side`,
    /// at least 1).
    pub side: usize,
}

/// Runs SpRAy on the attribution maps of one class; see the module documentation for the steps.
///
/// `maps`: each a row-major `h × w` non-negative map, all of the same `h`, `w`.
///
/// # Panics
/// If a map's length is not `h * w`.
pub fn spray<M: AsRef<[f32]>>(maps: &[M], h: usize, w: usize, p: &ClusterParams) -> Clustering {
    let side = p.side.max(1);
    let dim = side * side;
    let n = maps.len();
    for (i, m) in maps.iter().map(AsRef::as_ref).enumerate() {
        assert_eq!(m.len(), h * w, "spray: map {i} has {} values, expected {h}×{w}", m.len());
    }
    if n == 0 {
        return Clustering { labels: vec![], k: 0, eigenvalues: vec![], mean_maps: vec![], sizes: vec![], side };
    }

    // 1. Features: downsampled, sum-normalised maps, flattened n × dim (f64).
    let mut feats = vec![0.0f64; n * dim];
    for (i, m) in maps.iter().map(AsRef::as_ref).enumerate() {
        feature_into(m, h, w, side, &mut feats[i * dim..(i + 1) * dim]);
    }
    let feat = |i: usize| &feats[i * dim..(i + 1) * dim];

    // 2. Trivial and subsampled cases.
    let (labels, eigenvalues) = if n <= 2 {
        (vec![0usize; n], vec![])
    } else {
        let max_samples = p.max_samples.max(1);
        if n <= max_samples {
            let idx: Vec<usize> = (0..n).collect();
            spectral(&feats, dim, &idx, p)
        } else {
            let mut rng = SplitMix64::new(p.seed ^ 0x5350_5241_595f_5355); // "SPRAY_SU"
            let mut perm: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = rng.below(i + 1);
                perm.swap(i, j);
            }
            let mut idx = perm[..max_samples].to_vec();
            idx.sort_unstable();
            let (sub_labels, ev) = spectral(&feats, dim, &idx, p);
            let k = sub_labels.iter().max().map_or(1, |&m| m + 1);
            let means = cluster_means(&feats, dim, &idx, &sub_labels, k);
            let mut labels = vec![usize::MAX; n];
            for (&i, &l) in idx.iter().zip(&sub_labels) {
                labels[i] = l;
            }
            for (i, label) in labels.iter_mut().enumerate() {
                if *label == usize::MAX {
                    let f = feat(i);
                    let mut best = (f64::INFINITY, 0usize);
                    for (c, m) in means.chunks_exact(dim).enumerate() {
                        let d = sq_dist(f, m);
                        if d < best.0 {
                            best = (d, c);
                        }
                    }
                    *label = best.1;
                }
            }
            (labels, ev)
        }
    };

    // Relabel by descending size (ties: lowest first member), dropping empty clusters.
    let kmax = labels.iter().max().map_or(0, |&m| m + 1);
    let mut count = vec![0usize; kmax];
    let mut first = vec![usize::MAX; kmax];
    for (i, &l) in labels.iter().enumerate() {
        count[l] += 1;
        first[l] = first[l].min(i);
    }
    let mut order: Vec<usize> = (0..kmax).filter(|&c| count[c] > 0).collect();
    order.sort_by(|&a, &b| count[b].cmp(&count[a]).then(first[a].cmp(&first[b])));
    let mut remap = vec![usize::MAX; kmax];
    for (new, &old) in order.iter().enumerate() {
        remap[old] = new;
    }
    let labels: Vec<usize> = labels.iter().map(|&l| remap[l]).collect();
    let k = order.len();

    // 6. Sizes and mean maps over all input maps.
    let all: Vec<usize> = (0..n).collect();
    let means = cluster_means(&feats, dim, &all, &labels, k);
    let sizes: Vec<usize> = order.iter().map(|&c| count[c]).collect();
    let mean_maps = means.chunks_exact(dim).map(|m| m.iter().map(|&v| v as f32).collect()).collect();
    Clustering { labels, k, eigenvalues, mean_maps, sizes, side }
}

/// The feature vector [`spray`] clusters on: `map` area-downsampled to `side × side`
/// ([`area_downsample`]) and normalised to sum 1 (all zeros if it has no positive mass).
/// Directly comparable with [`Clustering::mean_maps`] (e.g. to find a cluster's most typical
/// members by Euclidean distance).
///
/// # Panics
/// If `map.len() != h * w`.
pub fn downsample(map: &[f32], h: usize, w: usize, side: usize) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "downsample: map has {} values, expected {h}×{w}", map.len());
    let mut out = vec![0.0f64; side * side];
    feature_into(map, h, w, side, &mut out);
    out.into_iter().map(|v| v as f32).collect()
}

fn feature_into(map: &[f32], h: usize, w: usize, side: usize, out: &mut [f64]) {
    pool_into(map, h, w, side, out);
    let s: f64 = out.iter().sum();
    if s > 0.0 && s.is_finite() {
        out.iter_mut().for_each(|v| *v /= s);
    } else {
        out.iter_mut().for_each(|v| *v = 0.0);
    }
}

/// Area-downsamples (or, where `side` exceeds a dimension, replicates) a row-major `h × w` map to
/// `side × side` with exact box averaging: output cell `(oy, ox)` is the mean of input rows
/// `⌊oy·h/side⌋ .. ⌈(oy+1)·h/side⌉` and columns `⌊ox·w/side⌋ .. ⌈(ox+1)·w/side⌉`, the bins of
/// PyTorch's `adaptive_avg_pool2d`. Non-finite and negative values count as 0. An empty map
/// (`h` or `w` 0) gives zeros.
///
/// # Panics
/// If `map.len() != h * w`.
pub fn area_downsample(map: &[f32], h: usize, w: usize, side: usize) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "area_downsample: map has {} values, expected {h}×{w}", map.len());
    let mut out = vec![0.0f64; side * side];
    pool_into(map, h, w, side, &mut out);
    out.into_iter().map(|v| v as f32).collect()
}

/// Box bins of `adaptive_avg_pool2d` along one axis: `(start, end)` per output index.
fn bins(len: usize, out: usize) -> Vec<(usize, usize)> {
    (0..out).map(|o| ((o * len) / out, ((o + 1) * len).div_ceil(out))).collect()
}

fn pool_into(map: &[f32], h: usize, w: usize, side: usize, out: &mut [f64]) {
    out.iter_mut().for_each(|v| *v = 0.0);
    if h == 0 || w == 0 || side == 0 {
        return;
    }
    let by = bins(h, side);
    let bx = bins(w, side);
    // Column sums over each row bin, then sums over column bins (the box is a product of ranges).
    let mut colsum = vec![0.0f64; w];
    for (oy, &(y0, y1)) in by.iter().enumerate() {
        colsum.iter_mut().for_each(|v| *v = 0.0);
        for row in map[y0 * w..y1 * w].chunks_exact(w) {
            for (c, &v) in colsum.iter_mut().zip(row) {
                if v > 0.0 && v.is_finite() {
                    *c += v as f64;
                }
            }
        }
        for (ox, &(x0, x1)) in bx.iter().enumerate() {
            let s: f64 = colsum[x0..x1].iter().sum();
            out[oy * side + ox] = s / ((y1 - y0) * (x1 - x0)) as f64;
        }
    }
}

#[inline]
fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Mean feature vector per cluster (`k × dim`, flattened) over the maps `idx` with `labels`.
fn cluster_means(feats: &[f64], dim: usize, idx: &[usize], labels: &[usize], k: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; k * dim];
    let mut cnt = vec![0usize; k];
    for (&i, &l) in idx.iter().zip(labels) {
        cnt[l] += 1;
        for (s, &v) in sums[l * dim..(l + 1) * dim].iter_mut().zip(&feats[i * dim..(i + 1) * dim]) {
            *s += v;
        }
    }
    for (c, &m) in cnt.iter().enumerate() {
        if m > 0 {
            sums[c * dim..(c + 1) * dim].iter_mut().for_each(|v| *v /= m as f64);
        }
    }
    sums
}

/// Steps 3–5 on the maps `idx` (at least 3). Returns labels (`0..k`, in `idx` order, not yet
/// size-ordered) and the smallest eigenvalues.
fn spectral(feats: &[f64], dim: usize, idx: &[usize], p: &ClusterParams) -> (Vec<usize>, Vec<f64>) {
    let n = idx.len();
    let feat = |a: usize| &feats[idx[a] * dim..(idx[a] + 1) * dim];

    // All maps identical: nothing to separate.
    if (1..n).all(|a| feat(a) == feat(0)) {
        return (vec![0; n], vec![]);
    }

    // 3. Pairwise squared distances, then the symmetric binary kNN graph.
    let mut dist = vec![0.0f64; n * n];
    for a in 0..n {
        for b in a + 1..n {
            let d = sq_dist(feat(a), feat(b));
            dist[a * n + b] = d;
            dist[b * n + a] = d;
        }
    }
    let knn = p.k_neighbors.max(1).min(n - 1);
    let mut adj = vec![false; n * n];
    let mut cand: Vec<usize> = Vec::with_capacity(n - 1);
    for a in 0..n {
        cand.clear();
        cand.extend((0..n).filter(|&b| b != a));
        let row = &dist[a * n..(a + 1) * n];
        let cmp = |x: &usize, y: &usize| row[*x].total_cmp(&row[*y]).then(x.cmp(y));
        if knn < cand.len() {
            cand.select_nth_unstable_by(knn - 1, cmp);
        }
        for &b in &cand[..knn] {
            adj[a * n + b] = true;
            adj[b * n + a] = true;
        }
    }
    drop(dist);
    let deg: Vec<f64> = (0..n).map(|a| adj[a * n..(a + 1) * n].iter().filter(|&&e| e).count() as f64).collect();
    let dinv: Vec<f64> = deg.iter().map(|&d| if d > 0.0 { 1.0 / d.sqrt() } else { 0.0 }).collect();
    let lap = DMatrix::<f64>::from_fn(n, n, |a, b| {
        if a == b {
            if deg[a] > 0.0 {
                1.0
            } else {
                0.0
            }
        } else if adj[a * n + b] {
            -dinv[a] * dinv[b]
        } else {
            0.0
        }
    });
    let (comp_of, comps) = components(&adj, n);
    drop(adj);

    // 4. Eigen-decomposition, ascending order, eigengap.
    let eig = SymmetricEigen::new(lap);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[a].total_cmp(&eig.eigenvalues[b]).then(a.cmp(&b)));
    let lam: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i]).collect();
    let kmax = p.max_clusters.max(1).min(n - 1);
    let eigenvalues = lam[..(kmax + 1).min(n)].to_vec();
    if (2..kmax).contains(&comps) {
        return (pieces(feats, dim, idx, &comp_of, comps, kmax, p), eigenvalues);
    }
    let k = if comps >= kmax { kmax } else { eigengap_k(&lam, kmax) };
    if k == 1 {
        return (vec![0; n], eigenvalues);
    }

    // 5. Row-normalised spectral embedding (n × k) and k-means.
    let mut emb = vec![0.0f64; n * k];
    for a in 0..n {
        let row = &mut emb[a * k..(a + 1) * k];
        for (j, &col) in order[..k].iter().enumerate() {
            row[j] = eig.eigenvectors[(a, col)];
        }
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let mut rng = SplitMix64::new(p.seed ^ 0x5350_5241_595f_4b4d); // "SPRAY_KM"
    (kmeans(&emb, k, k, &mut rng), eigenvalues)
}

/// The number of clusters of a connected graph from its normalised Laplacian's eigenvalues
/// `lam` (ascending, `lam[0] = 0`): of the `k` in `2..=kmax` whose first `k` eigenvalues sit
/// clearly below the next one (1-based `λ_k / λ_{k+1}` at most [`MAX_EIGEN_RATIO`] and
/// `λ_{k+1} − λ_k` at least [`MIN_EIGENGAP`]), the one with the smallest ratio (smallest `k` on
/// ties); 1 when there is none. Maps that vary smoothly around one place (a jittered blob) have
/// eigenvalues that grow steadily, in small steps that grow too: the plain largest-gap rule took
/// them for the most clusters allowed; both conditions refuse them.
fn eigengap_k(lam: &[f64], kmax: usize) -> usize {
    let mut best = (f64::INFINITY, 1);
    for k in 2..=kmax.min(lam.len() - 1) {
        let (below, next) = (lam[k - 1].max(0.0), lam[k]);
        let ratio = if next > 0.0 { below / next } else { 1.0 };
        if ratio <= MAX_EIGEN_RATIO && next - below >= MIN_EIGENGAP && ratio < best.0 {
            best = (ratio, k);
        }
    }
    best.1
}

/// Labels for maps `idx` whose kNN graph falls into `comps` (2 ≤ `comps` < `kmax`) separate
/// pieces (`comp_of`): every piece is its own group, never merged with a part of another (k-means
/// on the spectral embedding could split a large piece rather than keep a small one apart); a
/// piece of more than two maps is split further by the same analysis on its own maps, within
/// what is left of the `kmax` clusters (larger pieces first).
fn pieces(
    feats: &[f64],
    dim: usize,
    idx: &[usize],
    comp_of: &[usize],
    comps: usize,
    kmax: usize,
    p: &ClusterParams,
) -> Vec<usize> {
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); comps];
    for (a, &c) in comp_of.iter().enumerate() {
        members[c].push(a);
    }
    // Larger pieces first; `components` numbers pieces by their lowest member, so ties keep that.
    members.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let mut labels = vec![0usize; idx.len()];
    let (mut next, mut spare) = (0, kmax - comps);
    for piece in members {
        let sub = if piece.len() > 2 && spare > 0 {
            let sub_idx: Vec<usize> = piece.iter().map(|&a| idx[a]).collect();
            spectral(feats, dim, &sub_idx, &ClusterParams { max_clusters: spare + 1, ..p.clone() }).0
        } else {
            vec![0; piece.len()]
        };
        // The piece's labels as 0..parts (k-means may leave one unused).
        let mut used: Vec<usize> = sub.clone();
        used.sort_unstable();
        used.dedup();
        for (&a, l) in piece.iter().zip(&sub) {
            labels[a] = next + used.binary_search(l).unwrap_or(0);
        }
        next += used.len();
        spare -= used.len() - 1;
    }
    labels
}

/// The connected components of the graph with dense adjacency `adj` (`n × n`): each node's
/// component, numbered in order of their lowest node, and their number.
fn components(adj: &[bool], n: usize) -> (Vec<usize>, usize) {
    let mut comp = vec![usize::MAX; n];
    let mut stack = Vec::new();
    let mut count = 0;
    for s in 0..n {
        if comp[s] != usize::MAX {
            continue;
        }
        comp[s] = count;
        stack.push(s);
        while let Some(a) = stack.pop() {
            for (b, &e) in adj[a * n..(a + 1) * n].iter().enumerate() {
                if e && comp[b] == usize::MAX {
                    comp[b] = count;
                    stack.push(b);
                }
            }
        }
        count += 1;
    }
    (comp, count)
}

/// k-means on `pts` (`n × dim`, flattened) with k-means++ seeding; best of [`KMEANS_RESTARTS`].
fn kmeans(pts: &[f64], dim: usize, k: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let n = pts.len() / dim;
    let pt = |i: usize| &pts[i * dim..(i + 1) * dim];
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut labels = vec![0usize; n];
    let mut d2 = vec![0.0f64; n];
    for _ in 0..KMEANS_RESTARTS {
        // k-means++ seeding.
        let mut cent = vec![0.0f64; k * dim];
        let first = rng.below(n);
        cent[..dim].copy_from_slice(pt(first));
        for (i, d) in d2.iter_mut().enumerate() {
            *d = sq_dist(pt(i), &cent[..dim]);
        }
        for c in 1..k {
            let total: f64 = d2.iter().sum();
            let pick = if total > 0.0 {
                let r = rng.unit() * total;
                let mut acc = 0.0;
                let mut pick = n - 1;
                for (i, &d) in d2.iter().enumerate() {
                    acc += d;
                    if acc > r && d > 0.0 {
                        pick = i;
                        break;
                    }
                }
                pick
            } else {
                rng.below(n)
            };
            cent[c * dim..(c + 1) * dim].copy_from_slice(pt(pick));
            for (i, d) in d2.iter_mut().enumerate() {
                *d = d.min(sq_dist(pt(i), &cent[c * dim..(c + 1) * dim]));
            }
        }

        // Lloyd iterations.
        let mut inertia = f64::INFINITY;
        for it in 0..KMEANS_MAX_ITER {
            let mut changed = false;
            inertia = 0.0;
            for i in 0..n {
                let mut b = (f64::INFINITY, 0usize);
                for c in 0..k {
                    let d = sq_dist(pt(i), &cent[c * dim..(c + 1) * dim]);
                    if d < b.0 {
                        b = (d, c);
                    }
                }
                changed |= labels[i] != b.1;
                labels[i] = b.1;
                d2[i] = b.0;
                inertia += b.0;
            }
            if it > 0 && !changed {
                break;
            }
            // Update centroids; an empty cluster takes over the point farthest from its centroid.
            let mut cnt = vec![0usize; k];
            cent.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..n {
                cnt[labels[i]] += 1;
                for (c, &v) in cent[labels[i] * dim..(labels[i] + 1) * dim].iter_mut().zip(pt(i)) {
                    *c += v;
                }
            }
            for c in 0..k {
                if cnt[c] > 0 {
                    cent[c * dim..(c + 1) * dim].iter_mut().for_each(|v| *v /= cnt[c] as f64);
                } else {
                    let far = (0..n).max_by(|&a, &b| d2[a].total_cmp(&d2[b]).then(b.cmp(&a))).unwrap_or(0);
                    cent[c * dim..(c + 1) * dim].copy_from_slice(pt(far));
                    d2[far] = 0.0;
                }
            }
        }
        if best.as_ref().is_none_or(|(bi, _)| inertia < *bi) {
            best = Some((inertia, labels.clone()));
        }
    }
    best.map(|(_, l)| l).unwrap_or_else(|| vec![0; n])
}

/// SplitMix64 PRNG (Steele, Lea & Flood 2014): tiny, fast, fully deterministic.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `0..n` (`n > 0`), unbiased via Lemire's multiply-shift with rejection.
    fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: usize = 16;

    /// Gaussian blob of `radius` at `centre` (row, col) with a random overall scale (removed by
    /// the normalisation) plus uniform per-pixel noise of amplitude `noise`.
    fn planted(rng: &mut SplitMix64, centre: (f64, f64), radius: f64, noise: f32) -> Vec<f32> {
        let scale = 0.5 + 2.0 * rng.unit() as f32;
        let mut m = vec![0.0f32; S * S];
        for y in 0..S {
            for x in 0..S {
                let dy = y as f64 - centre.0;
                let dx = x as f64 - centre.1;
                let g = (-(dx * dx + dy * dy) / (2.0 * radius * radius)).exp() as f32;
                m[y * S + x] = scale * (g + noise * rng.unit() as f32);
            }
        }
        m
    }

    fn groups(spec: &[(usize, (f64, f64))], seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = SplitMix64::new(seed);
        let mut maps = vec![];
        let mut truth = vec![];
        for (g, &(count, centre)) in spec.iter().enumerate() {
            for _ in 0..count {
                maps.push(planted(&mut rng, centre, 1.5, 0.05));
                truth.push(g);
            }
        }
        // Interleave so that groups are not contiguous in the input.
        let mut perm: Vec<usize> = (0..maps.len()).collect();
        for i in (1..perm.len()).rev() {
            let j = rng.below(i + 1);
            perm.swap(i, j);
        }
        (perm.iter().map(|&i| maps[i].clone()).collect(), perm.iter().map(|&i| truth[i]).collect())
    }

    fn purity(labels: &[usize], truth: &[usize], k: usize) -> f64 {
        let g = truth.iter().max().unwrap() + 1;
        let mut table = vec![0usize; k * g];
        for (&l, &t) in labels.iter().zip(truth) {
            table[l * g + t] += 1;
        }
        let hit: usize = table.chunks(g).map(|r| *r.iter().max().unwrap()).sum();
        hit as f64 / labels.len() as f64
    }

    fn check_consistent(c: &Clustering, n: usize) {
        assert_eq!(c.labels.len(), n);
        assert_eq!(c.sizes.len(), c.k);
        assert_eq!(c.mean_maps.len(), c.k);
        assert_eq!(c.sizes.iter().sum::<usize>(), n);
        assert!(c.sizes.windows(2).all(|w| w[0] >= w[1]), "sizes not descending: {:?}", c.sizes);
        for (cl, &size) in c.sizes.iter().enumerate() {
            assert_eq!(c.labels.iter().filter(|&&l| l == cl).count(), size);
            assert!(size > 0);
        }
        assert!(c.eigenvalues.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn two_planted_groups() {
        let (maps, truth) = groups(&[(40, (2.0, 13.0)), (25, (7.5, 7.5))], 1);
        let c = spray(&maps, S, S, &ClusterParams::default());
        check_consistent(&c, 65);
        assert_eq!(c.k, 2, "eigenvalues {:?}", c.eigenvalues);
        assert_eq!(purity(&c.labels, &truth, c.k), 1.0);
        assert_eq!(c.sizes, vec![40, 25]);
        // Cluster 0 (the top-right group) has its mass in the top-right quadrant.
        let m = &c.mean_maps[0];
        assert!((m.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let tr: f32 = (0..8).flat_map(|y| (8..16).map(move |x| y * S + x)).map(|i| m[i]).sum();
        assert!(tr > 0.6, "top-right share {tr}");
        let m1 = &c.mean_maps[1];
        let centre: f32 = (5..11).flat_map(|y| (5..11).map(move |x| y * S + x)).map(|i| m1[i]).sum();
        assert!(centre > 0.6, "centre share {centre}");
    }

    #[test]
    fn three_planted_groups() {
        let (maps, truth) = groups(&[(30, (2.0, 13.0)), (25, (7.5, 7.5)), (20, (13.0, 2.0))], 2);
        let c = spray(&maps, S, S, &ClusterParams::default());
        check_consistent(&c, 75);
        assert_eq!(c.k, 3, "eigenvalues {:?}", c.eigenvalues);
        assert_eq!(purity(&c.labels, &truth, c.k), 1.0);
        assert_eq!(c.sizes, vec![30, 25, 20]);
    }

    #[test]
    fn more_components_than_max_clusters() {
        let (maps, truth) = groups(&[(30, (2.0, 13.0)), (25, (7.5, 7.5)), (20, (13.0, 2.0))], 6);
        let p = ClusterParams { max_clusters: 2, ..ClusterParams::default() };
        let c = spray(&maps, S, S, &p);
        check_consistent(&c, 75);
        assert_eq!(c.k, 2);
        // No planted group is split across clusters.
        for g in 0..3 {
            let ls: Vec<usize> = (0..75).filter(|&i| truth[i] == g).map(|i| c.labels[i]).collect();
            assert!(ls.iter().all(|&l| l == ls[0]), "group {g} split");
        }
    }

    /// One blob whose position and scale vary a little from map to map: one strategy, not the
    /// six the largest absolute eigengap found in such a spectrum.
    #[test]
    fn a_jittered_blob_is_one_cluster() {
        let mut rng = SplitMix64::new(21);
        let maps: Vec<Vec<f32>> = (0..300)
            .map(|_| {
                let (dy, dx) = (4.0 * rng.unit() - 2.0, 4.0 * rng.unit() - 2.0);
                planted(&mut rng, (7.5 + dy, 7.5 + dx), 1.5, 0.05)
            })
            .collect();
        let c = spray(&maps, S, S, &ClusterParams::default());
        check_consistent(&c, 300);
        assert_eq!(c.k, 1, "eigenvalues {:?}", c.eigenvalues);
    }

    /// A small group apart from a large, jittered one (a shortcut a few percent of a class use)
    /// is its own cluster, whole, and the large one is not split.
    #[test]
    fn a_small_distinct_group_beside_a_large_one_is_its_own_cluster() {
        let mut rng = SplitMix64::new(22);
        let mut maps = Vec::new();
        for i in 0..420 {
            let (dy, dx) = (4.0 * rng.unit() - 2.0, 4.0 * rng.unit() - 2.0);
            let centre = if i % 21 == 0 { (13.5 + dy / 4.0, 1.5 + dx / 4.0) } else { (7.5 + dy, 7.5 + dx) };
            maps.push(planted(&mut rng, centre, 1.5, 0.05));
        }
        let c = spray(&maps, S, S, &ClusterParams::default());
        check_consistent(&c, 420);
        assert_eq!(c.sizes, vec![400, 20], "eigenvalues {:?}", c.eigenvalues);
        assert!((0..420).all(|i| (c.labels[i] == 1) == (i % 21 == 0)), "the corner maps are cluster 1, alone");
    }

    #[test]
    fn pure_noise_is_one_cluster() {
        let mut rng = SplitMix64::new(11);
        let maps: Vec<Vec<f32>> = (0..80).map(|_| (0..S * S).map(|_| rng.unit() as f32).collect()).collect();
        let c = spray(&maps, S, S, &ClusterParams::default());
        check_consistent(&c, 80);
        assert_eq!(c.k, 1, "eigenvalues {:?}", c.eigenvalues);
        assert_eq!(c.eigenvalues.len(), 7);
    }

    #[test]
    fn larger_maps_are_downsampled() {
        // 64×48 maps: a left stripe vs a right stripe.
        let (h, w) = (64, 48);
        let mut rng = SplitMix64::new(3);
        let mut maps = vec![];
        let mut truth = vec![];
        for i in 0..45 {
            let left = i % 3 == 0;
            let m: Vec<f32> = (0..h * w)
                .map(|p| {
                    let x = p % w;
                    let on = if left { x < 12 } else { x >= 36 };
                    (if on { 1.0 } else { 0.0 }) + 0.1 * rng.unit() as f32
                })
                .collect();
            maps.push(m);
            truth.push(left as usize);
        }
        let c = spray(&maps, h, w, &ClusterParams::default());
        check_consistent(&c, 45);
        assert_eq!(c.k, 2);
        assert_eq!(purity(&c.labels, &truth, 2), 1.0);
        assert_eq!(c.sizes, vec![30, 15]);
        assert_eq!((c.side, c.mean_maps[0].len()), (16, 16 * 16));
        // Every map is nearer to its own cluster's mean map than to the other's.
        for (m, &l) in maps.iter().zip(&c.labels) {
            let f = downsample(m, h, w, c.side);
            let d: Vec<f32> =
                c.mean_maps.iter().map(|mm| f.iter().zip(mm).map(|(a, b)| (a - b) * (a - b)).sum()).collect();
            assert!(d[l] < d[1 - l]);
        }
    }

    #[test]
    fn identical_maps() {
        let m: Vec<f32> = (0..S * S).map(|i| (i % 7) as f32).collect();
        for n in [3, 4, 20] {
            let maps = vec![m.clone(); n];
            let c = spray(&maps, S, S, &ClusterParams::default());
            check_consistent(&c, n);
            assert_eq!(c.k, 1);
            assert_eq!(c, spray(&maps, S, S, &ClusterParams::default()));
        }
        // All-zero maps and a mixture of zero maps and duplicates.
        let zeros = vec![vec![0.0f32; S * S]; 10];
        let c = spray(&zeros, S, S, &ClusterParams::default());
        check_consistent(&c, 10);
        assert_eq!(c.k, 1);
        assert!(c.mean_maps[0].iter().all(|&v| v == 0.0));
        let mut mixed = vec![vec![0.0f32; S * S]; 15];
        mixed.extend(vec![m.clone(); 12]);
        let c = spray(&mixed, S, S, &ClusterParams::default());
        check_consistent(&c, 27);
        assert_eq!(c.k, 2);
        assert_eq!(purity(&c.labels, &[vec![0; 15], vec![1; 12]].concat(), 2), 1.0);
        assert_eq!(c.sizes, vec![15, 12]);
    }

    #[test]
    fn tiny_inputs() {
        let p = ClusterParams::default();
        let c = spray::<Vec<f32>>(&[], 4, 4, &p);
        assert_eq!((c.k, c.labels.len(), c.sizes.len(), c.mean_maps.len()), (0, 0, 0, 0));
        let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..16).map(|i| (16 - i) as f32).collect();
        let c = spray(std::slice::from_ref(&a), 4, 4, &p);
        check_consistent(&c, 1);
        assert_eq!((c.k, c.labels.clone()), (1, vec![0]));
        let c = spray(&[a.clone(), b.clone()], 4, 4, &p);
        check_consistent(&c, 2);
        assert_eq!((c.k, c.labels.clone()), (1, vec![0, 0]));
        // Three maps: the spectral path with k_neighbors capped at n − 1.
        let c = spray(&[a.clone(), b.clone(), a.clone()], 4, 4, &p);
        check_consistent(&c, 3);
        // Degenerate parameters and empty maps.
        let odd = ClusterParams { k_neighbors: 0, max_clusters: 0, max_samples: 0, side: 0, seed: 9 };
        let c = spray(&[a.clone(), b.clone(), a.clone(), b.clone()], 4, 4, &odd);
        check_consistent(&c, 4);
        let c = spray(&[vec![], vec![], vec![]], 0, 5, &p);
        check_consistent(&c, 3);
        assert_eq!(c.k, 1);
    }

    #[test]
    fn subsample_assigns_every_map() {
        let (maps, truth) = groups(&[(60, (2.0, 13.0)), (40, (7.5, 7.5))], 4);
        let p = ClusterParams { max_samples: 30, ..ClusterParams::default() };
        let c = spray(&maps, S, S, &p);
        check_consistent(&c, 100);
        assert!(c.labels.iter().all(|&l| l < c.k));
        assert_eq!(c.k, 2);
        assert_eq!(purity(&c.labels, &truth, c.k), 1.0);
        assert_eq!(c.sizes, vec![60, 40]);
        assert!(c.eigenvalues.len() <= p.max_clusters + 1);
        // A subsample too small to split still labels everything.
        let p = ClusterParams { max_samples: 2, ..ClusterParams::default() };
        let c = spray(&maps, S, S, &p);
        check_consistent(&c, 100);
        assert_eq!(c.k, 1);
    }

    #[test]
    fn downsample_exact() {
        #[rustfmt::skip]
        let m = [
            1.0, 2.0,   3.0, 4.0,
            5.0, 6.0,   7.0, 8.0,
            9.0, 10.0,  11.0, 12.0,
            13.0, 14.0, 15.0, 16.0f32,
        ];
        assert_eq!(area_downsample(&m, 4, 4, 2), vec![3.5, 5.5, 11.5, 13.5]);
        assert_eq!(area_downsample(&m, 4, 4, 1), vec![8.5]);
        assert_eq!(area_downsample(&m, 4, 4, 4), m.to_vec());
        // Non-divisible: 3 → 2 uses overlapping bins [0,2) and [1,3), like adaptive_avg_pool2d.
        let r = [1.0, 2.0, 3.0f32];
        assert_eq!(area_downsample(&r, 1, 3, 2), vec![1.5, 2.5, 1.5, 2.5]);
        // Upsampling 2 → 4 replicates.
        let q = [1.0, 2.0, 3.0, 4.0f32];
        assert_eq!(
            area_downsample(&q, 2, 2, 4),
            vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]
        );
        // Negative / non-finite values count as 0.
        assert_eq!(area_downsample(&[-1.0, f32::NAN, 2.0, 2.0], 2, 2, 1), vec![1.0]);
        // The clustering feature: box average, then sum 1.
        let f = downsample(&m, 4, 4, 2);
        let t = 3.5 + 5.5 + 11.5 + 13.5;
        assert_eq!(f, vec![3.5 / t, 5.5 / t, 11.5 / t, 13.5 / t]);
        assert_eq!(downsample(&[0.0; 16], 4, 4, 2), vec![0.0; 4]);
    }

    #[test]
    fn deterministic_for_seed() {
        let (maps, _) = groups(&[(40, (2.0, 13.0)), (25, (7.5, 7.5)), (15, (13.0, 2.0))], 5);
        for seed in [0, 7] {
            let p = ClusterParams { seed, ..ClusterParams::default() };
            assert_eq!(spray(&maps, S, S, &p), spray(&maps, S, S, &p));
            let p = ClusterParams { seed, max_samples: 50, ..ClusterParams::default() };
            assert_eq!(spray(&maps, S, S, &p), spray(&maps, S, S, &p));
        }
    }

    #[test]
    fn splitmix_below_in_range() {
        let mut r = SplitMix64::new(1);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7);
            seen[v] = true;
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(seen.iter().all(|&s| s));
    }
}
