"""Runs in every rank for tests/model/test_build.py, through tests.harness.distributed.run_ranks."""


def chunk_positions(pp: int, vpp: int) -> list[dict]:
    """This rank's chunks of the tiny preset at PP x VPP: where each sits in the pipeline and what it holds."""
    from tinyllm_mcore.model.build import build_chunks, transformer_config
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime import distributed as rt

    rt.initialize(pp=pp, vpp=vpp)
    preset = get_preset("tiny")
    config = transformer_config(preset, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                use_cpu_initialization=True)
    return [{"vp_stage": chunk.vp_stage, "pre_process": chunk.pre_process, "post_process": chunk.post_process,
             "layers": [layer.layer_number for layer in chunk.decoder.layers],
             "embedding": hasattr(chunk, "embedding"), "output_layer": hasattr(chunk, "output_layer")}
            for chunk in build_chunks(preset, config)]
