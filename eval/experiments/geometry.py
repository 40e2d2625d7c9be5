"""Decoder geometry: 2-D UMAP of decoder directions coloured by partition, and cluster recovery.

Each feature's direction is its decoder row for both models, ``[d^A, d^B]`` (normalised
space), scaled to unit length. Clusters (k-means with one cluster per partition, on the
UMAP embedding) are compared with the partition labels (adjusted Rand index, NMI).

The control tells architecture from labelling: a DFC's masks force exclusive rows to zero
in one half, so its partitions are separable whatever they mean. The same clustering of
the standard crosscoder against a random partition of matched sizes must recover nothing
(ARI ≈ 0); recovery above that control is the architecture, not the features' meaning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PARTS = ("a_exclusive", "b_exclusive", "shared")


def directions(cc: Any) -> np.ndarray:
    w = cc.W_dec.detach().float()  # [D, 2, d]
    v = w.reshape(w.shape[0], -1)
    return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()


def partition_labels(cc: Any) -> np.ndarray:
    labels = np.full(cc.dict_size, 2)
    p = cc.partition
    labels[list(p.a_exclusive)] = 0
    labels[list(p.b_exclusive)] = 1
    return labels


def random_matched_labels(sizes: dict[str, int], dict_size: int, seed: int) -> np.ndarray:
    """A random partition with the DFC's sizes (the control's labels)."""
    labels = np.full(dict_size, 2)
    perm = np.random.default_rng(seed).permutation(dict_size)
    n_a, n_b = sizes["a_exclusive"], sizes["b_exclusive"]
    labels[perm[:n_a]] = 0
    labels[perm[n_a : n_a + n_b]] = 1
    return labels


def embed(vectors: np.ndarray, seed: int, n_neighbors: int = 30, min_dist: float = 0.1) -> tuple[np.ndarray, str]:
    """2-D embedding: UMAP (the paper's n_neighbors=30, min_dist=0.1) or PCA when umap-learn is missing."""
    try:
        import umap

        nn = max(2, min(n_neighbors, len(vectors) - 1))
        return umap.UMAP(n_neighbors=nn, min_dist=min_dist, random_state=seed, n_components=2, metric="cosine").fit_transform(vectors), "umap"
    except ImportError:
        centred = vectors - vectors.mean(0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        return u[:, :2] * s[:2], "pca (umap-learn not installed)"


def recovery(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """k-means (k = number of label values) on the embedding vs the labels: ARI, NMI, silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    k = len(np.unique(labels))
    if k < 2:
        return {"ari": None, "nmi": None, "silhouette_of_labels": None, "n_clusters": k}
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
    return {
        "n_clusters": k,
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "silhouette_of_labels": float(silhouette_score(embedding, labels)),
    }


def run_geometry(dfc: Any, standard: Any | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Embed and cluster the DFC's decoder directions; the control is the standard CC with a random matched partition."""
    if not dfc.is_dfc:
        raise ValueError("geometry needs a DFC (a dictionary with exclusive partitions)")
    vec = directions(dfc)
    emb, method = embed(vec, seed)
    labels = partition_labels(dfc)
    rel = dfc.relative_decoder_norm().detach().numpy()
    out: dict[str, Any] = {
        "method": method, "n_features": int(len(vec)), "sizes": dfc.partition.sizes(),
        "dfc": {"recovery": recovery(emb, labels, seed), "embedding": emb.round(4).tolist(), "labels": labels.tolist(),
                "relative_decoder_norm_by_partition": {p: float(rel[labels == i].mean()) for i, p in enumerate(PARTS) if (labels == i).any()}},
    }
    if standard is not None:
        svec = directions(standard)
        semb, _ = embed(svec, seed)
        slabels = random_matched_labels(dfc.partition.sizes(), standard.dict_size, seed)
        out["control"] = {"what": "standard crosscoder, random partition of matched sizes", "recovery": recovery(semb, slabels, seed),
                          "embedding": semb.round(4).tolist(), "labels": slabels.tolist()}
    # A-exclusive features alone (the paper's cluster discovery), clustered into 2 groups.
    a_idx = np.where(labels == 0)[0]
    if len(a_idx) >= 6:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        sub, _ = embed(vec[a_idx], seed, n_neighbors=min(30, len(a_idx) - 1))
        cl = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(sub)
        out["a_exclusive_clusters"] = {"sizes": np.bincount(cl).tolist(), "silhouette": float(silhouette_score(sub, cl)) if len(set(cl)) > 1 else None}
    return out


def geometry_figure(result: dict[str, Any]):
    """Scatter of the embedding coloured by partition (DFC) beside the control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dfc", "DFC: partitions")] + ([("control", "standard CC: random matched partition")] if "control" in result else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    colours = {0: "tab:red", 1: "tab:blue", 2: "lightgray"}
    for ax, (key, title) in zip(axes[0], panels):
        emb = np.asarray(result[key]["embedding"])
        lab = np.asarray(result[key]["labels"])
        for i in (2, 0, 1):
            m = lab == i
            ax.scatter(emb[m, 0], emb[m, 1], s=6 if i == 2 else 10, c=colours[i], label=f"{PARTS[i]} ({int(m.sum())})", alpha=0.8)
        rec = result[key]["recovery"]
        ari = rec.get("ari")
        ax.set_title(f"{title}\nARI={ari:.2f}" if ari is not None else title, fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"decoder directions ({result['method']}, n={result['n_features']} features)", fontsize=10)
    fig.tight_layout()
    return fig
