"""Several classes in one open-vocabulary query ("red star; blue circle"): one row per class sharing the image's
encoding, merged into one result whose instances carry the class asked and their own scores."""

from __future__ import annotations

import pytest

import fiore
from fiore.data.synthetic import make_sample
from fiore.predictor import Predictor, predict
from fiore.request import Request
from fiore.results import Boxes, Mixed, Polygons
from fiore.tasks import TaskInputError

OVD = "open_vocabulary_detection"


def test_a_class_list_is_one_request_per_class_and_other_tasks_keep_their_text():
    parts = Request.make(OVD, " red star ;blue circle; red star;; ").parts()
    assert [p.text for p in parts] == ["red star", "blue circle"]
    assert all(p.task.name == OVD for p in parts)
    single = Request.make(OVD, "red star")
    assert single.parts() == [single]
    grounding = Request.make("caption_to_phrase_grounding", "a star; a circle")
    assert grounding.parts() == [grounding]  # a caption may contain ';': only class-list tasks split
    with pytest.raises(TaskInputError, match="no class names"):
        Request.make(OVD, "; ;").parts()


def test_merge_labels_instances_by_the_class_asked_and_keeps_their_scores():
    star = Mixed(
        boxes=Boxes([[1, 2, 3, 4], [5, 6, 7, 8]], ["star", "star"], scores=[0.9, 0.5]),
        task=OVD,
        score=0.8,
        warnings=["cut short"],
    )
    circle = Mixed(
        polygons=Polygons([[[0, 0, 4, 0, 4, 4]]], ["a ring"], scores=[0.7]), task=OVD, score=0.6, truncated=True
    )
    nothing = Mixed(task=OVD, score=None)
    merged = Mixed.merge([star, circle, nothing], ["red star", "blue circle", "green square"])
    assert merged.boxes.boxes == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert merged.boxes.labels == ["red star", "red star"]
    assert merged.boxes.scores == [0.9, 0.5]
    assert merged.polygons.labels == ["blue circle"] and merged.polygons.scores == [0.7]
    assert merged.truncated and merged.score == pytest.approx(0.7)
    assert merged.warnings == ["red star: cut short"]
    assert [i.label for i in merged.instances()] == ["red star", "red star", "blue circle"]


@pytest.fixture(scope="module")
def florence():
    return fiore.load()


def test_a_class_list_answers_the_union_of_the_single_class_queries(florence):
    image = make_sample(12345, 0).image
    classes = ["red star", "blue circle", "green square"]
    merged = predict(florence, image, OVD, text="; ".join(classes))
    alone = [predict(florence, image, OVD, text=c) for c in classes]
    expected = [
        (box, c, score)
        for c, one in zip(classes, alone, strict=True)
        for box, score in zip(one.boxes.boxes, one.boxes.scores, strict=True)
    ]
    assert len(expected) > 0, "the model found nothing for any class: the comparison would be empty"
    assert len(merged.boxes) == len(expected)
    for box, label, score, (want_box, want_label, want_score) in zip(
        merged.boxes.boxes, merged.boxes.labels, merged.boxes.scores, expected, strict=True
    ):
        assert box == pytest.approx(want_box, abs=1e-3)
        assert label == want_label
        assert score == pytest.approx(want_score, rel=1e-3)


def test_class_lists_and_single_queries_mix_in_one_predictor_call(florence):
    image = make_sample(12345, 1).image
    predictor = Predictor(florence)
    predictor.set_images([image, image])
    answers = predictor.predict(
        [[Request.make(OVD, "red star; blue circle"), Request.make("caption")], [Request.make(OVD, "red star")]]
    )
    assert [len(a) for a in answers] == [2, 1]
    assert isinstance(answers[0][0], Mixed) and set(answers[0][0].boxes.labels) <= {"red star", "blue circle"}
    assert answers[0][1].task == "caption" and answers[0][1].as_text()
    merged = answers[0][0].boxes
    pairs = zip(merged.boxes, merged.labels, strict=True)
    first_class = [v for box, label in pairs if label == "red star" for v in box]
    assert first_class == pytest.approx([v for box in answers[1][0].boxes.boxes for v in box], abs=1e-3)
