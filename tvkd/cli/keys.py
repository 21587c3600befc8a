"""`tvkd keys create | list | revoke`: the API keys, managed in the database directly (like
`tvkd serve`, it upgrades the database first). Settings come from the environment and `.env`:
TVKD_DATABASE_URL, and TVKD_SECRET_KEY (or the secret generated under TVKD_HOME), which must be
the API's.

    tvkd keys create --name ci        # prints the new key once, on stdout; store it now
    tvkd keys list                    # id, name, created, hash scheme (--all: revoked ones too)
    tvkd keys revoke key_0123abcd…    # the API refuses it within 10 s

Rotation: create a new key, move the clients to it, revoke the old one. Needs the `service` extra.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="create, list and revoke API keys (in the database)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="make a new key and print it once")
    create.add_argument("--name", default="key", help="a label for listings (default: key)")
    listing = sub.add_parser("list", help="the stored keys (never the keys themselves)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = sub.add_parser("revoke", help="revoke a key by its id (key_…)")
    revoke.add_argument("key_id")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from service.auth import KeyConfigError, create_key, list_keys, revoke_key, server_secret
        from service.db import make_engine, session_factory
        from service.settings import Settings
        from tvkd.cli.serve import migrate
    except ImportError as exc:
        print(f"tvkd keys: needs the service extra: pip install 'tvkd[service]' ({exc.name} is missing)",
              file=sys.stderr)  # fmt: skip
        return 2
    settings = Settings()
    try:
        secret = server_secret(settings)
        migrate(settings.resolved_database_url)
    except KeyConfigError as exc:
        print(f"tvkd keys: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.resolved_database_url)
    factory = session_factory(engine)
    try:
        if args.keys_command == "create":
            try:
                row, key = create_key(factory, args.name, secret)
            except KeyConfigError as exc:
                print(f"tvkd keys: {exc}", file=sys.stderr)
                return 2
            print(f"created {row.id} ({row.name}); the key is shown this once:", file=sys.stderr)
            print(key, flush=True)
        elif args.keys_command == "list":
            rows = list_keys(factory, revoked=args.all)
            print(f"{'id':<29} {'name':<20} {'created (UTC)':<19} {'revoked (UTC)':<19} hash")
            for row in rows:
                revoked = row.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if row.revoked_at else "-"
                created = row.created_at.strftime("%Y-%m-%d %H:%M:%S")
                print(f"{row.id:<29} {row.name[:20]:<20} {created:<19} {revoked:<19} {row.hash_scheme}")
        else:
            try:
                row = revoke_key(factory, args.key_id)
            except LookupError as exc:
                print(f"tvkd keys: {exc}", file=sys.stderr)
                return 1
            print(f"revoked {row.id} ({row.name}); the API refuses it within 10 s")
    finally:
        engine.dispose()
    return 0
