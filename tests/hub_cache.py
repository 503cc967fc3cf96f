"""A Hugging Face Hub cache laid out by hand, as huggingface_hub writes it (for offline pulls in tests)."""

import hashlib
import os


def build_cache(cache_dir, repo_id, files_by_sha, refs):
    """The real huggingface_hub cache layout: refs/<branch>, snapshots/<sha>/<file> -> blobs/<hash>."""
    root = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for branch, sha in refs.items():
        with open(os.path.join(root, "refs", branch), "w") as f:
            f.write(sha)
    for sha, files in files_by_sha.items():
        for name, data in files.items():
            blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
            with open(blob, "wb") as f:
                f.write(data)
            link = os.path.join(root, "snapshots", sha, name)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return root
