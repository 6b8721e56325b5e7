import logging

import pytest

from quantization_utils import ACT_QUANTIZERS, StudentSpec, register_act_quantizer
from utils.runs import config
from utils.runs.config import Options, load_options, options_from_dict, parse_override
from utils.system.errors import ConfigError

from ..conftest import CIFAR10_CONF, CIFAR10A_CONF, ROOT


def test_official_configs_load_with_official_values():
    c10 = load_options(CIFAR10_CONF)
    assert (c10.batchSize, c10.nEpochs, c10.warmup_epochs, c10.temperature, c10.lr_S, c10.lr_G) == \
        (16, 200, 4, 20.0, 1e-4, 1e-3)
    assert c10.step_S == [100, 200, 300] and c10.iters_per_epoch == 200
    c100 = load_options(f"{ROOT}/CIFAR/cifar100_resnet20.hocon")
    assert (c100.dataset, c100.network, c100.nClasses, c100.batchSize) == ("cifar100", "resnet20_cifar100", 100, 200)


def test_resnet20a_config_includes_the_cifar10_settings():
    options = load_options(CIFAR10A_CONF)
    assert options.network == "resnet20a_cifar10"
    assert options.norm_mean == [0.485, 0.456, 0.406] and options.norm_std == [0.229, 0.224, 0.225]
    assert options.batchSize == 16 and options.temperature == 20.0


def test_command_line_bits_and_overrides():
    options = load_options(CIFAR10_CONF, ["lr_S=2e-4", "step_S=[5, 10]", "dataPath=https://x.org/a:b//c",
                                          "tensorboard=true", "norm_mean=[0.5, 0.5, 0.5]"], qw=5, qa=4)
    assert (options.qw, options.qa, options.lr_S, options.step_S) == (5, 4, 2e-4, [5, 10])
    assert options.dataPath == "https://x.org/a:b//c" and options.tensorboard is True
    assert options.norm_mean == [0.5, 0.5, 0.5]


def test_every_registered_activation_quantizer_is_an_act_mode():
    assert [load_options(CIFAR10_CONF, [f"act_mode={mode}"]).act_mode for mode in ("layerwise", "channel", "granq")] \
        == ["layerwise", "channel", "granq"]
    @register_act_quantizer("identity_for_config_test")
    def identity(x, bits):
        """y = x."""
        return x

    try:
        assert load_options(CIFAR10_CONF, ["act_mode=identity_for_config_test"]).act_mode == "identity_for_config_test"
    finally:
        del ACT_QUANTIZERS["identity_for_config_test"]


def test_override_types():
    assert parse_override("batchSize=32") == ("batchSize", 32)
    assert parse_override("temperature=5") == ("temperature", 5.0)
    assert parse_override('teacher_weights="my file.pth"') == ("teacher_weights", "my file.pth")


def test_unknown_key_names_it_and_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): bachSize\. Valid keys: .*batchSize"):
        load_options(CIFAR10_CONF, ["bachSize=3"])
    conf = tmp_path / "bad.hocon"
    conf.write_text(f'include "{CIFAR10_CONF}"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="unknown config key.*learning_rate"):
        load_options(str(conf))


@pytest.mark.parametrize("override, message", [
    ("batchSize=abc", "batchSize must be an integer, got 'abc'"),
    ("batchSize=1.5", "batchSize must be an integer, got 1.5"),
    ("lr_S=fast", "lr_S must be a number"),
    ("step_S=[1, x]", "step_S must be a list of integers"),
    ("tensorboard=3", "tensorboard must be true or false"),
    ("qa=9", "qa = 9 is out of range"),
    ("qw=1", "qw = 1 is out of range"),
    ("nClasses=100", "nClasses = 100 disagrees with network 'resnet20_cifar10'"),
    ("network=resnet18", "network 'resnet18' is a imagenet model but dataset = 'cifar10'"),
    ("network=vgg", "network = 'vgg' is unknown. Give a pytorchcv classification model .*; close names: vgg"),
    ("network=resnet56_cifar100", "network 'resnet56_cifar100' is a cifar100 model but dataset = 'cifar10'"),
    ("network=torchvision:resnet18", "network 'torchvision:resnet18' is a imagenet model but dataset = 'cifar10'"),
    ("act_types=[relu, swish]", r"act_types = \['relu', 'swish'\]: 'swish' is not valid; choose from: relu, relu6, "
                                "hardswish, silu, gelu, leaky_relu"),
    ("act_types=[]", r"act_types = \[\] names no activation"),
    ("act_types=relu", "act_types must be a list of strings"),
    ("act_mode=minmax", "act_mode = 'minmax' is not valid; choose one of: granq, layerwise, channel$"),
    ("weight_granularity=tensor", "weight_granularity = 'tensor' is not valid"),
    ("batchSize=0", "batchSize = 0 must be at least 1"),
    ("iters_per_epoch=0", "iters_per_epoch = 0 must be at least 1"),
    ("temperature=0", "temperature = 0.0 must be positive"),
    ("img_size=30", "img_size = 30 must be a positive multiple of 4"),
    ("norm_std=[1, 1]", r"norm_std = \[1.0, 1.0\] needs 3 values"),
    ("lrPolicy_S=linear", "lrPolicy_S = 'linear' is not valid; choose one of: multi_step, const, cosine"),
    ("nosuchkey", "--set expects key=value"),
    ("student_losses=[kd, focal]", r"student_losses = \['kd', 'focal'\]: 'focal' is not a registered term; choose "
                                   "from: "),
    ("student_losses=[]", r"student_losses = \[\] names no term; choose from: "),
    ("student_losses=[kd, cam, kd]", "lists a term twice"),
    ("student_input_filter=gauss", "student_input_filter = 'gauss' is not valid; choose one of: none, lowpass$"),
    ("lowpass_d0=0", "lowpass_d0 = 0.0 must be positive"),
    ("attention_temperature=-1", "attention_temperature = -1.0 must be positive"),
    ("cam_weight=-1", "cam_weight = -1.0 must be at least 0"),
    ("reliable_ce_tau=1.5", r"reliable_ce_tau = 1.5 must be in \(0, 1\]"),
    ("pseudo_label_lower=0.6", "pseudo_label_lower = 0.6 and pseudo_label_upper = 0.5 must satisfy"),
    ("recipe=nosuch", "recipe = 'nosuch': no such recipe; choose from: adadfq, gdfq, granq, plus, synq, synq_granq, "
                      "zeroq"),
])
def test_bad_values_get_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_options(CIFAR10_CONF, [override])


@pytest.mark.parametrize("value", ["none", "false", "on", "", "eval cache"])
def test_eval_cache_is_auto_off_or_a_directory(value, tmp_path):
    assert load_options(CIFAR10_CONF).eval_cache == "auto"
    for valid in ("auto", "off", "./cache", "~/cache", str(tmp_path)):
        assert load_options(CIFAR10_CONF, [f"eval_cache={valid}"]).eval_cache == valid
    with pytest.raises(ConfigError, match=f"eval_cache = '{value}' is not valid: auto .*, off, or a directory path"):
        load_options(CIFAR10_CONF, [f"eval_cache={value}"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="eval_cache = '.*file' is a file: give a directory"):
        load_options(CIFAR10_CONF, [f"eval_cache={tmp_path / 'file'}"])
    conf = tmp_path / "off.hocon"
    conf.write_text(f'include "{CIFAR10_CONF}"\neval_cache = false\n')
    with pytest.raises(ConfigError, match="eval_cache must be a string, got False"):
        load_options(str(conf))


def test_missing_and_unparsable_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_options(str(tmp_path / "none.hocon"))
    bad = tmp_path / "bad.hocon"
    bad.write_text("batchSize = [1,\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_options(str(bad))


def test_resolved_config_round_trips(tmp_path):
    options = load_options(CIFAR10A_CONF, ["dataPath=/data/c10", "qw=5"])
    path = tmp_path / "config.hocon"
    path.write_text(options.to_hocon())
    assert load_options(str(path)) == options


def test_generator_follows_dataset():
    assert Options().generator_kind == "label_embedding"
    assert Options(dataset="imagenet", generator="").generator_kind == "conditional_bn"


def test_pytorchcv_network_with_the_official_config():
    options = load_options(CIFAR10_CONF, ["network=resnet56_cifar10"])
    assert (options.network, options.dataset, options.nClasses, options.img_size) == ("resnet56_cifar10", "cifar10",
                                                                                      10, 32)


@pytest.mark.parametrize("network, expected", [
    ("resnet56_cifar100", ("cifar100", 100, 32)),
    ("torchvision:mobilenet_v2", ("imagenet", 1000, 224)),
    ("mobilenetv2_w1", ("imagenet", 1000, 224)),
])
def test_dataset_classes_and_size_come_from_the_name_where_the_config_omits_them(network, expected, tmp_path):
    conf = tmp_path / "minimal.hocon"
    conf.write_text(f'network = "{network}"\ndataPath = "/data"\n')
    options = load_options(str(conf))
    assert (options.dataset, options.nClasses, options.img_size) == expected
    # A size the config sets is taken as given (the teacher check at start-up tells whether the model runs on it).
    assert load_options(str(conf), ["img_size=160"]).img_size == 160


def test_user_model_takes_dataset_classes_and_size_from_the_config():
    options = load_options(CIFAR10_CONF, ["network=tests.e2e.user_models:tiny_net", "dataset=cifar100",
                                          "nClasses=7", "img_size=16"])
    assert (options.dataset, options.nClasses, options.img_size) == ("cifar100", 7, 16)
    with pytest.raises(ConfigError, match="nClasses = 1 must be at least 2"):
        load_options(CIFAR10_CONF, ["network=tests.e2e.user_models:tiny_net", "nClasses=1"])


def test_act_types_default_and_round_trip(tmp_path):
    assert load_options(CIFAR10_CONF).act_types == ["relu", "relu6"] == Options().act_types
    options = load_options(CIFAR10_CONF, ['act_types=["relu", "hardswish"]'])
    assert options.act_types == ["relu", "hardswish"]
    path = tmp_path / "config.hocon"
    path.write_text(options.to_hocon())
    assert load_options(str(path)) == options


def test_the_former_name_of_quant_impl_is_read_with_one_warning(tmp_path, caplog):
    config._current_key.cache_clear()
    conf = tmp_path / "old.hocon"
    conf.write_text(f'include "{CIFAR10_CONF}"\ngranq_impl = compiled\n')
    with caplog.at_level(logging.WARNING, logger="utils.runs.config"):
        assert load_options(CIFAR10_CONF, ["granq_impl=eager"]).quant_impl == "eager"
        assert load_options(str(conf)).quant_impl == "compiled"
        saved = {("granq_impl" if key == "quant_impl" else key): value for key, value in Options().to_dict().items()}
        assert options_from_dict({**saved, "granq_impl": "eager"}).quant_impl == "eager"  # a run saved with it
    assert [r.getMessage() for r in caplog.records] == ["config key granq_impl is deprecated: read as quant_impl"]
    # where both names are given, the current one wins
    both = {**Options().to_dict(), "quant_impl": "compiled", "granq_impl": "eager"}
    assert options_from_dict(both).quant_impl == "compiled"
    assert "granq_impl" not in Options().to_dict()


def test_the_options_give_the_student_spec():
    options = load_options(CIFAR10_CONF, ["act_mode=channel", "weight_granularity=channel", "quant_impl=eager",
                                          'act_types=["relu", "hardswish"]'], qw=5, qa=4)
    spec = options.student_spec()
    assert spec == StudentSpec.of(5, 4, mode="channel", granularity="channel", impl="eager",
                                  act_types=["relu", "hardswish"])
    assert spec == StudentSpec.from_dict(options.to_dict()) == StudentSpec.from_dict(spec.to_dict())
    assert {key: getattr(options, key) for key in spec.to_dict() if key != "act_momentum"} == \
        {key: value for key, value in spec.to_dict().items() if key != "act_momentum"}


def test_unknown_student_loss_lists_every_registered_term():
    from utils.training.losses import student_loss_names

    with pytest.raises(ConfigError) as error:
        load_options(CIFAR10_CONF, ["student_losses=[kd, focal]"])
    assert str(error.value).endswith(f"choose from: {', '.join(student_loss_names())}")
    assert set(student_loss_names()) >= {"kd", "attention", "cam", "reliable_ce", "pseudo_label"}


def test_student_loss_defaults_and_the_papers_dataset_values():
    default = load_options(CIFAR10_CONF)
    assert (default.student_losses, default.student_input_filter) == (["kd"], "none")
    assert (default.attention_weight, default.attention_temperature, default.cam_weight, default.lowpass_d0) == \
        (1000.0, 8.0, 200.0, 80.0)
    cifar100 = load_options(f"{ROOT}/CIFAR/cifar100_resnet20.hocon")
    imagenet = load_options(f"{ROOT}/ImageNet/imagenet_res18.hocon")
    assert (default.reliable_ce_tau, cifar100.reliable_ce_tau, imagenet.reliable_ce_tau) == (0.7, 0.5, 0.5)
    assert (cifar100.pseudo_label_upper, cifar100.pseudo_label_lower, cifar100.pseudo_label_beta) == (0.5, 0.2, 0.3)
    assert (imagenet.pseudo_label_upper, imagenet.pseudo_label_lower, imagenet.pseudo_label_beta) == (0.4, 0.1, 0.5)
    assert (cifar100.cam_weight, imagenet.cam_weight) == (200.0, 50.0)


def test_a_recipe_sets_what_the_config_leaves_open_and_set_still_wins(tmp_path):
    plus = load_options(CIFAR10A_CONF, ["recipe=plus"])
    assert plus.student_losses == ["kd", "cam", "reliable_ce"]
    assert plus.student_input_filter == "none" and plus.recipe == "plus"
    assert plus.reliable_ce_tau == 0.7  # the CIFAR-10 config's own value
    mine = load_options(CIFAR10A_CONF, ["recipe=plus", "student_input_filter=lowpass"])
    assert mine.student_input_filter == "lowpass" and mine.student_losses == plus.student_losses
    path = tmp_path / "config.hocon"
    path.write_text(mine.to_hocon())
    assert load_options(str(path)) == mine
    included = tmp_path / "included.hocon"
    included.write_text(f'include "{CIFAR10A_CONF}"\ninclude "{ROOT}/recipes/plus.hocon"\n')
    assert load_options(str(included)).student_losses == plus.student_losses


def test_a_recipe_named_by_set_replaces_the_config_file_s_keys_and_one_named_in_the_file_does_not(tmp_path):
    synq = load_options(CIFAR10A_CONF, ["recipe=synq"])
    # the dataset config sets act_mode = granq and weight_granularity = kernel; the method's recipe replaces them
    assert (synq.image_source, synq.act_mode, synq.weight_granularity) == ("pool", "layerwise", "channel")
    assert synq.reliable_ce_tau == 0.7 and synq.nEpochs == 200  # what the recipe leaves out stays the config's
    assert load_options(CIFAR10A_CONF, ["recipe=synq", "act_mode=granq"]).act_mode == "granq"  # --set still wins
    assert load_options(CIFAR10A_CONF, ["recipe=zeroq"]).nEpochs == 0
    # the resolved config.hocon names the recipe and loads to the same options, a --set change to its keys included
    mine = load_options(CIFAR10A_CONF, ["recipe=synq", "act_mode=channel"])
    path = tmp_path / "config.hocon"
    path.write_text(mine.to_hocon())
    assert load_options(str(path)) == mine and mine.recipe == "synq"
