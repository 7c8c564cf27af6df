"""Task catalogue: names, lookup, prompt validation, parse/serialize basics, examples from a Sample."""

import pytest

import fiore
from fiore import tasks
from fiore.data.sample import QA, Grounding, Object, Ref, Sample, TextItem
from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Text
from fiore.tasks import TaskInputError

OFFICIAL = [
    "<OCR>", "<OCR_WITH_REGION>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>",
    "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
    "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
]  # fmt: skip


def test_catalogue():
    assert fiore.tasks is tasks
    tokens = {t.token for t in tasks.all()}
    assert set(OFFICIAL) | {"<CLASSIFY>", "<VQA>"} == tokens and len(tasks.names()) == 17
    for t in tasks.all():
        assert t.token == f"<{t.name.upper()}>"
        assert tasks.get(t.name) is t and tasks.get(t.token) is t and tasks.get(t.name.upper()) is t
        assert t.inputs in ("none", "text", "region") and t.max_new_tokens > 0
    assert tasks.get("od").max_new_tokens > tasks.get("caption").max_new_tokens
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        tasks.get("nope")


def test_prompts_and_validation():
    assert tasks.get("od").prompt() == "Locate the objects with category name in the image."
    assert tasks.get("vqa").prompt(text=" how many stars? ") == "Answer the question: how many stars?"
    rtc = tasks.get("region_to_category")
    assert (
        rtc.prompt(region=[0, 0, 400, 300], image_size=(800, 600))
        == "What is the region <loc_0><loc_0><loc_500><loc_500>?"
    )
    assert rtc.prompt(region="<loc_1><loc_2><loc_3><loc_4>") == "What is the region <loc_1><loc_2><loc_3><loc_4>?"
    with pytest.raises(TaskInputError, match="needs a region"):
        rtc.prompt()
    with pytest.raises(TaskInputError, match="image_size"):
        rtc.prompt(region=[0, 0, 1, 1])
    with pytest.raises(TaskInputError, match="x1 <= x2"):
        rtc.prompt(region=[5, 0, 1, 1], image_size=(10, 10))
    with pytest.raises(TaskInputError, match="outside"):
        rtc.prompt(region=[50, 50, 60, 60], image_size=(10, 10))
    with pytest.raises(TaskInputError, match="exactly 4"):
        rtc.prompt(region="<loc_1><loc_2>")
    with pytest.raises(TaskInputError, match="needs a text input"):
        tasks.get("caption_to_phrase_grounding").prompt()
    with pytest.raises(TaskInputError, match="takes no input"):
        tasks.get("caption").prompt(text="x")
    with pytest.raises(TaskInputError, match="the limit is 1000"):
        tasks.get("vqa").prompt(text="x" * 1001)


def test_parse_examples():
    size = (800, 600)
    r = tasks.get("od").parse("</s><s>car<loc_54><loc_375><loc_906><loc_707></s>", image_size=size)
    assert isinstance(r, Boxes) and r.labels == ["car"] and r.scores is None and r.score is None
    assert r.boxes == [pytest.approx([43.6, 225.3, 725.2, 424.5])]
    assert all(isinstance(v, float) for v in r.boxes[0])
    text = tasks.get("caption").parse("</s><s>A cat.</s>", image_size=size)
    assert isinstance(text, Text) and text.text == "A cat." and text.to_florence() == {"<CAPTION>": "A cat."}
    lab = tasks.get("region_to_category").parse("</s><s>car<loc_1><loc_2><loc_3><loc_4></s>", size)
    assert isinstance(lab, Label) and lab.label == "car"
    assert lab.to_florence() == {"<REGION_TO_CATEGORY>": "car<loc_1><loc_2><loc_3><loc_4>"}
    trunc = tasks.get("od").parse("</s><s>car<loc_54><loc_375><loc_906>", size)
    assert len(trunc) == 0 and trunc.warnings  # truncated mid-box: nothing made up, a warning instead


CAP = "a star and a circle"


def _sample():
    objs = [
        Object((10, 10, 50, 50), "star", polygons=[[10, 10, 50, 10, 30, 50]], description="a red star"),
        Object((60, 60, 90, 90), "circle"),
    ]
    return Sample(
        image_id=1, width=100, height=100, objects=objs,
        captions={"caption": "a star and a circle"},
        texts=[TextItem("HI", (1, 1, 20, 1, 20, 9, 1, 9), (1, 1, 20, 9))],
        refs=[Ref("the red star", 0)],
        groundings=[Grounding(CAP, [("a star", [(10, 10, 50, 50)]), ("a circle", [(60, 60, 90, 90)])])],
        qas=[QA("how many shapes?", "2")], label="shapes", vocabulary=["star", "square"],
    )  # fmt: skip


def test_examples_and_round_trip():
    s = _sample()
    ex = {t.name: t.examples(s) for t in tasks.all()}
    assert ex["od"][0].target.labels == ["star", "circle"]
    assert ex["region_proposal"][0].target.labels == ["", ""]
    assert ex["dense_region_caption"][0].target.labels == ["a red star"]
    assert [e.target.label for e in ex["region_to_category"]] == ["star", "circle"]
    assert ex["region_to_category"][0].region == (10, 10, 50, 50)
    assert ex["referring_expression_segmentation"][0].text == "the red star"
    assert isinstance(ex["referring_expression_segmentation"][0].target, Polygons)
    assert len(ex["region_to_segmentation"]) == 1  # only objects with polygons
    assert [e.text for e in ex["open_vocabulary_detection"]] == ["star"]  # "square" is absent
    assert isinstance(ex["open_vocabulary_detection"][0].target, Mixed)
    assert isinstance(ex["ocr_with_region"][0].target, Quads) and ex["ocr"][0].target.text == "HI"
    assert isinstance(ex["caption_to_phrase_grounding"][0].target, Phrases)
    assert ex["classify"][0].target.label == "shapes" and ex["vqa"][0].target.text == "2"
    assert ex["more_detailed_caption"] == []
    for name, examples in ex.items():
        task = tasks.get(name)
        for e in examples:
            task.prompt(text=e.text, region=e.region, image_size=s.size)  # every example's inputs are valid
            target = task.serialize(e.target, s.size)
            assert "<s>" not in target and target
            back = task.parse("</s><s>" + target + "</s>", s.size)
            assert type(back) is type(e.target), name
            assert back.warnings == [], (name, back.warnings)


# What official Florence-2 checkpoints emit for each task (after `</s><s>`): Microsoft's sample notebook and model
# card answers, in the grammar of the shared reference's parse rules (section 3.5). A target fiore trains on must
# have the same shape, so that a fiore-trained model speaks to every client that reads Florence-2 output.
OFFICIAL_SHAPES = {
    "caption": r"[^<]+",
    "detailed_caption": r"[^<]+",
    "more_detailed_caption": r"[^<]+",
    "ocr": r"[^<]+",
    "vqa": r"[^<]+",
    "classify": r"[^<]+",
    "od": r"([^<]+(<loc_\d+>){4})+",
    "dense_region_caption": r"([^<]+(<loc_\d+>){4})+",
    "region_proposal": r"((<loc_\d+>){4})+",
    "caption_to_phrase_grounding": r"([^<]+((<loc_\d+>){4})+)+",
    "referring_expression_segmentation": r"(<loc_\d+>)+(<sep>(<loc_\d+>)+)*",
    "region_to_segmentation": r"(<loc_\d+>)+(<sep>(<loc_\d+>)+)*",
    "open_vocabulary_detection": r"([^<]+(<loc_\d+>){4})+",
    "ocr_with_region": r"([^<]+(<loc_\d+>){8})+",
    # region tasks: the answer, then the region's own 4 loc tokens echoed ('car<loc_52><loc_332><loc_932><loc_774>')
    "region_to_category": r"[^<]+(<loc_\d+>){4}",
    "region_to_description": r"[^<]+(<loc_\d+>){4}",
    "region_to_ocr": r"[^<]+(<loc_\d+>){4}",
}


def test_training_targets_have_the_official_output_format():
    import re

    from fiore.tasks.locations import box_to_tokens

    s = _sample()
    seen = set()
    for task in tasks.all():
        for e in task.examples(s):
            target = task.target(e, s.size)
            assert re.fullmatch(OFFICIAL_SHAPES[task.name], target), (task.name, target)
            if task.inputs == "region" and task.name != "region_to_segmentation":
                assert target.endswith(box_to_tokens(e.region, s.size)), task.name  # the echo is the input region
                back = task.parse("</s><s>" + target + "</s>", s.size)
                assert "<loc_" not in back.to_json()["label" if task.name == "region_to_category" else "text"]
            seen.add(task.name)
    assert set(OFFICIAL_SHAPES) == set(tasks.names())
    assert seen == set(OFFICIAL_SHAPES) - {"detailed_caption", "more_detailed_caption"}  # not in this sample
    r2c = tasks.get("region_to_category")
    example = tasks.Example(region=(52.4, 332.0, 932.9, 774.6), target=Label("car"))
    assert r2c.target(example, (1000, 1000)) == "car<loc_52><loc_332><loc_932><loc_774>"
