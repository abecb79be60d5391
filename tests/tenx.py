"""10x Genomics feature-barcode matrices written as Space Ranger / Xenium write them, for reader tests."""

import h5py
import numpy as np


def write_10x_h5(path, barcodes, genes, types, csc, library="sample1"):
    """A 10x HDF5 feature-barcode matrix (Space Ranger's ``filtered_feature_bc_matrix.h5``, Xenium's
    ``cell_feature_matrix.h5``): genes × barcodes CSC, as 10x stores it."""
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library.encode()])
        m = f.create_group("matrix")
        m["barcodes"] = np.asarray(barcodes).astype("S")
        m["data"], m["indices"], m["indptr"] = csc.data, csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        feat = m.create_group("features")
        feat["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        feat["name"] = np.array(genes, dtype="S")
        feat["feature_type"] = np.array(types, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
