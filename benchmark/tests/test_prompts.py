from textgen.benchmark.prompts import WORDS, make_prompts


def test_prompts_are_seeded_and_of_the_asked_length():
    prompts = make_prompts(num_prompts=5, num_words=32, seed=0)
    assert prompts == make_prompts(num_prompts=5, num_words=32, seed=0)
    assert prompts != make_prompts(num_prompts=5, num_words=32, seed=1)
    assert len(set(prompts)) == 5
    for prompt in prompts:
        words = prompt.split()
        assert len(words) == 32
        assert set(words) <= set(WORDS)
