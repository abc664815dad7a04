"""Register the scoring flow as a deployment of a Prefect *process* work pool.

Runs inside the worker image (the flow's code lives at /app there): the worker of that
pool (`prefect worker start --pool cellpipe --type process`) picks up the deployment's
runs and runs them in /app. The work pool is created when missing. Defaults come from the
``flows:`` section of params.yaml; the inbox and results are the stack's volumes.

    python3 deploy_scoring.py --url triton:8001 [--pool cellpipe] [--no-schedule]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

APP = Path("/app")


async def ensure_pool(name: str) -> None:
    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            print(f"deploy_scoring: created the process work pool {name!r}")
        except ObjectAlreadyExists:
            pass


def main() -> None:
    flows_params = yaml.safe_load((APP / "params.yaml").read_text()).get("flows", {})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="Triton host:port for --protocol")
    parser.add_argument("--protocol", choices=("grpc", "http"),
                        default=flows_params.get("protocol", "grpc"))
    parser.add_argument("--inbox", default="/data/inbox")
    parser.add_argument("--out", default="/results")
    parser.add_argument("--pool", default="cellpipe")
    parser.add_argument("--name", default="inbox")
    parser.add_argument("--cron", default=flows_params.get("scoring_cron"))
    parser.add_argument("--no-schedule", action="store_true", help="runs start on demand only")
    args = parser.parse_args()

    asyncio.run(ensure_pool(args.pool))
    scoring = flow.from_source(source=str(APP), entrypoint="flows/scoring.py:scoring")
    deployment_id = scoring.deploy(
        name=args.name, work_pool_name=args.pool,
        parameters={"inbox": args.inbox, "out": args.out, "url": args.url,
                    "protocol": args.protocol, "params_file": str(APP / "params.yaml")},
        cron=None if args.no_schedule else args.cron,
        build=False, push=False, print_next_steps=False)
    print(f"deploy_scoring: deployment scoring/{args.name} ({deployment_id}) on pool "
          f"{args.pool!r}, Triton {args.url} ({args.protocol})")


if __name__ == "__main__":
    main()
