"""The example packshot campaign (examples/briefs/product-launch.csv: packshots, and a row with a layout sketch)
end to end on the bundled model and the ControlNet shipped beside it, on a local folder with SQLite and on S3 with
PostgreSQL: every delivered file holds the packshot (read back here from the file), the sketched row is steered by
the ControlNet, and a second run renders nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from engine.packshot import packshot_rgba
from flows.campaign import campaign_run
from flows.channels import load_channels
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, Variant
from storage.variants import parse_inputs
from tests.flows.test_product_campaign import _expected
from tests.helpers import ROOT

BRIEF = ROOT / "examples" / "briefs" / "product-launch.csv"


@pytest.mark.parametrize("backend", ["sqlite-local", "postgresql-s3"])
def test_the_example_packshot_campaign(backend: str, tmp_path, campaign_caches, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite-local":
        db_url, store_url = f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "assets")
    else:
        db_url = request.getfixturevalue("postgres_url")
        store_url = f"s3://{request.getfixturevalue('s3_bucket')}/ex?endpoint_url={request.getfixturevalue('s3_endpoint')}"
    overrides = {"steps": 3, "sampler": "Euler", "db_url": db_url, "store_url": store_url}
    summary = campaign_run(str(BRIEF), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["failed"] == 0, summary
    rendered = summary["counts"]["rendered"]
    assert rendered == 10
    channels = load_channels()
    db = open_database(db_url)
    store = open_store(store_url)
    with db.session() as s:
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id)).all()
    db.dispose()
    assert len(rows) == rendered
    sketched = 0
    for variant, asset in rows:
        inputs = parse_inputs(variant.inputs)
        product = inputs.product
        assert product is not None
        data = store.get(asset.storage_key)
        if inputs.control is not None:  # the row with a layout sketch, steered by the ControlNet shipped beside the model
            sketched += 1
            assert (inputs.control.type, inputs.control.model_name) == ("scribble", "adforge-demo-scribble")
            assert "Module: scribble, Model: adforge-demo-scribble" in read_image_metadata(data)[0]
        packshot = packshot_rgba(Image.open(BRIEF.parent / product.file))
        canvas = (channels[variant.channel].width, channels[variant.channel].height)
        want, opaque, _ = _expected(packshot, canvas, product.placement)
        delivered = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        _, _, params = parse_infotext(read_image_metadata(data)[0])
        alone = np.where(opaque[..., None], want, 127).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(alone).save(buf, "JPEG", quality=int(params["Output quality"]))
        encoder = np.abs(np.asarray(Image.open(buf).convert("RGB"))[opaque].astype(int) - want[opaque]).mean()
        assert np.abs(delivered[opaque].astype(int) - want[opaque]).mean() < encoder + 3, (variant.channel, product.placement)
        assert asset.product_changed is False
    assert sketched == 2
    assert campaign_run(str(BRIEF), overrides=overrides)["counts"]["rendered"] == 0
