"""The extension report's reading states what the numbers say: who beats the control at the
target length, by how much, and the short-context cost."""

from megatron_longctx.eval.extension_report import ExtensionResults, reading


def test_reading_follows_the_numbers():
    results = ExtensionResults(
        lengths=[256, 2048],
        perplexity={"base": {256: 10.0, 2048: 900.0}, "control": {256: 9.0, 2048: 400.0},
                    "abf": {256: 9.5, 2048: 12.0}, "pi": {256: 14.0, 2048: 401.0}},
        passkey={"base": {256: 0.9, 2048: 0.0}, "abf": {256: 0.8, 2048: 0.5}})
    text = reading(results, "base", "control", 256)
    assert "control (the base trained further at 256 tokens" in text
    assert "perplexity 400.00 and the base 900.00" in text
    assert "Beating the control there: abf 12.00 (33.3x lower)." in text
    assert "Not beating it: pi 401.00." in text
    assert "The best at 2048 is abf; at the training length (256) it scores 9.50 against the " \
           "control's 9.00, so the extension costs short-context quality" in text
    assert "Passkey retrieval at 2048 tokens (mean over depths): base 0%, abf 50%." in text
    assert "At 256 tokens the base retrieves 90% of keys" in text
    results.passkey["base"][256] = 0.0
    assert "The base retrieves no key even at its 256-token" in reading(results, "base",
                                                                        "control", 256)
    # a method at the control's level is not counted as beating it
    results.perplexity["abf"][2048] = 400.0
    assert "Beating" not in reading(results, "base", "control", 256)
