"""mixlm release OUT_DIR --repo-id ORG/NAME [--dry-run]: refresh the model card of an exported folder (with
eval scores when given) and upload the folder to the Hugging Face Hub; --dry-run lists what would be
uploaded, writes the re-rendered card to a preview file beside the folder (--preview PATH, or '-' to print it)
and touches neither the folder nor the network."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mixlm.commands.export import add_card_arguments, card_options

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
REQUIRED = ("config.json", "README.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a folder written by `mixlm export`")
    parser.add_argument("--repo-id", required=True, help="Hub model repo, ORG/NAME")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be uploaded and write the re-rendered card to --preview; no network")
    parser.add_argument("--preview", default="",
                        help="with --dry-run: where to write the re-rendered model card ('-' prints it); "
                        "default: FOLDER.README.preview.md next to the folder, which stays untouched")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default="", help="default: 'mixlm release <name>'")
    add_card_arguments(parser)


def release_files(folder: Path) -> list[Path]:
    """The files to upload: everything under `folder` except hidden files and folders."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def check_folder(folder: Path, repo_id: str) -> None:
    from mixlm.errors import ExportError

    if not REPO_ID.match(repo_id):
        raise ExportError(f"--repo-id {repo_id!r}: expected ORG/NAME (letters, digits, '.', '_', '-')")
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder")
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ExportError(f"{folder}: not an exported model folder (missing {', '.join(missing)}); run "
                          "`mixlm export` first")


def preview_path(folder: Path, preview: str) -> Path:
    """Where --dry-run writes the re-rendered card: --preview, else FOLDER.README.preview.md beside the folder."""
    return Path(preview) if preview else folder.resolve().with_name(f"{folder.resolve().name}.README.preview.md")


def write_preview(folder: Path, card_text: str, preview: str) -> None:
    """The card the release would upload: printed ('-') or written to `preview_path` (never into `folder`)."""
    if preview == "-":
        print(card_text)
        return
    path = preview_path(folder, preview)
    if folder.resolve() in path.resolve().parents:  # it would be uploaded (or replace the card) with the folder
        print(f"mixlm release: --preview {preview} is inside {folder}; choose a path outside it", file=sys.stderr)
        return
    path.write_text(card_text)
    print(f"model card preview (README.md as it would be uploaded): {path}")


def upload(folder: Path, files: list[Path], repo_id: str, *, private: bool, commit_message: str) -> str:
    """Creates the repo if needed and commits exactly `files` in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    return str(getattr(info, "commit_url", info))


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import ExportError
    from mixlm.hf.provenance import PROVENANCE_FILE, render_folder_card

    folder = Path(args.folder)
    try:
        check_folder(folder, args.repo_id)
        card = card_options(args, default_name=args.repo_id)
        card_text = None
        if (folder / PROVENANCE_FILE).is_file():
            card_text = render_folder_card(folder, card)
        elif args.eval_results:
            raise ExportError(f"{folder}: no {PROVENANCE_FILE}, so the card cannot be re-rendered with "
                              "--eval-results; re-export the folder")
    except ExportError as e:
        print(f"mixlm release: {e}", file=sys.stderr)
        return 2
    files = release_files(folder)
    total = sum(p.stat().st_size for p in files)
    message = args.commit_message or f"mixlm release {args.repo_id.split('/')[-1]}"
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} file{'' if len(files) == 1 else 's'} "
          f"({total / 1e9:.3f} GB) to "
          f"https://huggingface.co/{args.repo_id} ({'private' if args.private else 'public'}), "
          f"commit {message!r}:")
    for p in files:
        note = " (model card re-rendered)" if p.name == "README.md" and card_text is not None else ""
        print(f"  {p.relative_to(folder).as_posix():<48} {p.stat().st_size:>15,} bytes{note}")
    if args.dry_run:
        if card_text is not None:
            write_preview(folder, card_text, args.preview)
        return 0
    if card_text is not None:
        (folder / "README.md").write_text(card_text)
    url = upload(folder, files, args.repo_id, private=args.private, commit_message=message)
    print(f"released: {url}")
    return 0
